-- Nexmark q14's user-defined function: how many times the character c
-- occurs in s (Flink writes it in Java; here it is SQL).
CREATE FUNCTION count_char(s VARCHAR, c VARCHAR) RETURNS BIGINT LANGUAGE SQL
AS $$ SELECT length(s) - length(replace(s, c, '')) $$;
