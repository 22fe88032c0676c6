"""The tiny random Llama the trainer, packing and model tests build: real classes, a few thousand weights."""

TINY_LLAMA = {
    "arch": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention: two query heads share each key/value head
    "max_position_embeddings": 128,
}
