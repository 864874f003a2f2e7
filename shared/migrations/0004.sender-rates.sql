-- Messages per channel and sender address in fixed time windows, counted by
-- every router together to spot mail loops between auto-responders. Rows of
-- windows long past are deleted by the routers from time to time.
-- depends: 0001.initial

CREATE TABLE sender_rates (
    channel_id    bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    sender        text NOT NULL,
    window_start  timestamptz NOT NULL,
    messages      integer NOT NULL,
    PRIMARY KEY (channel_id, sender, window_start)
);
CREATE INDEX sender_rates_window ON sender_rates (window_start);
