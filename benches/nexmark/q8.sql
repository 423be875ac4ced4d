-- Monitor new users: people who opened an auction in the window they joined.
SELECT P.id, P.name, P.starttime
FROM (
    SELECT P.id, P.name, window_start AS starttime, window_end AS endtime
    FROM TUMBLE(person, date_time, INTERVAL '10' SECOND) P
    GROUP BY P.id, P.name, window_start, window_end
) P
JOIN (
    SELECT A.seller, window_start AS starttime, window_end AS endtime
    FROM TUMBLE(auction, date_time, INTERVAL '10' SECOND) A
    GROUP BY A.seller, window_start, window_end
) A
ON P.id = A.seller AND P.starttime = A.starttime AND P.endtime = A.endtime
