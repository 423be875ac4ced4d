-- User sessions: bids per bidder per session (10-second gap).
SELECT B.bidder, count(*) AS bid_count, window_start AS starttime, window_end AS endtime
FROM SESSION(bid, date_time, INTERVAL '10' SECOND) B
GROUP BY B.bidder, window_start, window_end
