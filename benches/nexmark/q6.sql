-- Average selling price by seller over its last 10 auctions (each
-- auction's highest bid so far, which changes while it is open).
-- Nexmark's original text takes MAX(B.price) next to an ungrouped
-- B.date_time, which is not valid SQL; Flink and RisingWave rank each
-- auction's bids with ROW_NUMBER() and keep the first instead. This is
-- RisingWave's q6-group-top1 with the highest bid first, as Flink orders
-- it (RisingWave's ORDER BY B.price keeps the lowest).
SELECT Q.seller, AVG(Q.final) OVER (PARTITION BY Q.seller ORDER BY Q.date_time ROWS BETWEEN 10 PRECEDING AND CURRENT ROW) AS avg
FROM (
    SELECT ROW_NUMBER() OVER (PARTITION BY A.id, A.seller ORDER BY B.price DESC) AS rank, A.seller, B.price AS final, B.date_time
    FROM auction AS A, bid AS B
    WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires
) AS Q
WHERE Q.rank <= 1
