-- The ten highest bids of each auction (top-N).
SELECT * FROM (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY auction ORDER BY price DESC) AS rank_number
    FROM bid
) t
WHERE rank_number <= 10
