"""LangChain integration for llm-aligner (AlignerRunnable, AlignedChatModel): see docs/langchain.md."""
