# GPT-2 XL (1.5B): Table 5 of the TWEO supplementary (48 layers, d_model 1600, 25 heads of 64).
n_layer = 48
n_embd = 1600
n_head = 25
total_batch_tokens = 1048576  # 1M tokens per optimizer step
micro_batch_size = 8  # per GPU; lower it if you run out of memory, accumulation grows to match
learning_rate = 0.0002
min_lr = 2.0e-05  # cosine decay to 10% of the peak
activation_checkpointing = False
