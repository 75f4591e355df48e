"""Jobs above the facade: a file of records corrected to a file (``files``: resumable, chunked, durable), the same
spread over a Ray cluster (``ray``), and the record readers and JSONL writers they share (``records``, ``jsonl``)."""
