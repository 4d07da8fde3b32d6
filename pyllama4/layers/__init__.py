"""Model building blocks. Each one computes exactly what transformers' Llama 4 computes."""
