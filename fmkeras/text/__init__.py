"""Text processing: WordPiece tokenization and masked-LM data pipelines."""
