"""Models served by pyllama4."""
