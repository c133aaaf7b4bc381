# GPT-2 3B (2.7B): Table 5 of the TWEO supplementary (32 layers, d_model 2560, 32 heads of 80).
n_layer = 32
n_embd = 2560
n_head = 32
total_batch_tokens = 1048576  # 1M tokens per optimizer step
micro_batch_size = 8  # per GPU; lower it if you run out of memory, accumulation grows to match
learning_rate = 0.00016
min_lr = 1.6e-05  # cosine decay to 10% of the peak
activation_checkpointing = True
