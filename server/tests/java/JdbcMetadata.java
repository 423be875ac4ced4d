import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;

/**
 * What JDBC tools (DBeaver, DataGrip, Metabase) ask first: the product,
 * the schemas, the tables (streams and views included) and their columns
 * through DatabaseMetaData, and a prepared statement. Prints one fact per
 * line. Usage: java JdbcMetadata PORT
 */
public class JdbcMetadata {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/analytics?user=jdbc";
        try (Connection c = DriverManager.getConnection(url)) {
            DatabaseMetaData md = c.getMetaData();
            System.out.println("product " + md.getDatabaseProductName() + " " + md.getDatabaseProductVersion());
            try (ResultSet rs = md.getSchemas()) {
                while (rs.next()) {
                    System.out.println("schema " + rs.getString("TABLE_SCHEM"));
                }
            }
            try (ResultSet rs = md.getTables(null, "public", "%", null)) {
                while (rs.next()) {
                    System.out.println("table " + rs.getString("TABLE_NAME") + " " + rs.getString("TABLE_TYPE"));
                }
            }
            try (ResultSet rs = md.getColumns(null, "public", "users", "%")) {
                while (rs.next()) {
                    System.out.println("column " + rs.getString("TABLE_NAME") + "." + rs.getString("COLUMN_NAME")
                            + " " + rs.getString("TYPE_NAME") + " " + rs.getInt("ORDINAL_POSITION")
                            + " " + rs.getString("IS_NULLABLE"));
                }
            }
            try (PreparedStatement p = c.prepareStatement("SELECT name FROM users WHERE id = ?")) {
                p.setInt(1, 2);
                try (ResultSet rs = p.executeQuery()) {
                    while (rs.next()) {
                        System.out.println("row " + rs.getString(1));
                    }
                }
            }
        }
    }
}
