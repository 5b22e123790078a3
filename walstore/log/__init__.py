"""The write-ahead log: its byte format (format), segment files (segment), the one writer
(writer), the one reader (reader) and record payloads (records).  docs/FORMAT.md tells
the same story for humans."""
