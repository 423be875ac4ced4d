-- The three Nexmark streams, as RisingWave declares them, fed by Drizzle's
-- nexmark connector. {options} is replaced by the harness (rate, bound,
-- base time, partitions). {proctime} is `p_time TIMESTAMPTZ AS PROCTIME(),`
-- for q12 (processing-time windows) and empty for the others: q13 adds its
-- own p_time (`SELECT *, PROCTIME() AS p_time FROM bid`).
CREATE STREAM person (
    id BIGINT, name VARCHAR, email_address VARCHAR, credit_card VARCHAR, city VARCHAR,
    state VARCHAR, date_time TIMESTAMP, extra VARCHAR,
    WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND
) WITH (connector = 'nexmark', nexmark.table.type = 'person'{options});
CREATE STREAM auction (
    id BIGINT, item_name VARCHAR, description VARCHAR, initial_bid BIGINT, reserve BIGINT,
    date_time TIMESTAMP, expires TIMESTAMP, seller BIGINT, category BIGINT, extra VARCHAR,
    WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND
) WITH (connector = 'nexmark', nexmark.table.type = 'auction'{options});
CREATE STREAM bid (
    auction BIGINT, bidder BIGINT, price BIGINT, channel VARCHAR, url VARCHAR,
    date_time TIMESTAMP, extra VARCHAR,{proctime}
    WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND
) WITH (connector = 'nexmark', nexmark.table.type = 'bid'{options});
