-- Where each Microsoft Graph folder's delta query stopped: the next link of
-- a round in progress, or the delta link that starts the next round.
-- depends: 0001.initial

CREATE TABLE graph_delta_links (
    channel_id  bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    folder_id   text NOT NULL,
    delta_link  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, folder_id)
);
