-- Processing-time windows: bids per bidder per 10 seconds of processing time.
-- Flink computes the processing time in the query and groups by its legacy
-- group window, (SELECT *, PROCTIME() AS p_time FROM bid) B ... GROUP BY
-- B.bidder, TUMBLE(B.p_time, INTERVAL '10' SECOND); here bid declares it
-- (p_time TIMESTAMPTZ AS PROCTIME(), the DDL change), and the window is the
-- TUMBLE table function over it, as RisingWave writes windows.
SELECT bidder, count(*) AS bid_count, window_start AS starttime, window_end AS endtime
FROM TUMBLE(bid, p_time, INTERVAL '10' SECOND)
GROUP BY bidder, window_start, window_end
