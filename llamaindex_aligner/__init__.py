"""LlamaIndex integration for llm-aligner (AlignerNodePostprocessor, AlignedQueryEngine): see docs/llamaindex.md."""
