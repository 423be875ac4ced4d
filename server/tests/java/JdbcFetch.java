import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;

/**
 * Reads a continuous query through JDBC with a fetch size, as tools do:
 * the driver then reads through a portal, 2 rows per Execute. Prints one
 * value per line. Usage: java JdbcFetch PORT QUERY
 */
public class JdbcFetch {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/drizzle?user=drivers";
        try (Connection c = DriverManager.getConnection(url)) {
            c.setAutoCommit(false); // the driver uses a portal only inside a transaction
            try (Statement s = c.createStatement()) {
                s.setFetchSize(2);
                try (ResultSet rs = s.executeQuery(args[1])) {
                    while (rs.next()) {
                        System.out.println(rs.getLong(1));
                    }
                }
            }
            c.commit();
        }
    }
}
