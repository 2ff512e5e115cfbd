-- The trace of the request that caused an event (its W3C traceparent),
-- so the span that dispatches it later links to that trace
-- (cell/src/notice/dispatch.rs). Empty for events no request caused.
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
