-- Processing-time windows: bids per bidder per 10 seconds of processing time.
SELECT B.bidder, count(*) AS bid_count, window_start AS starttime, window_end AS endtime
FROM (SELECT *, PROCTIME() AS p_time FROM bid) B
GROUP BY B.bidder, TUMBLE(B.p_time, INTERVAL '10' SECOND)
