# GPT-2 7B (6.7B): Table 5 of the TWEO supplementary (32 layers, d_model 4096, 32 heads of 128).
n_layer = 32
n_embd = 4096
n_head = 32
total_batch_tokens = 1048576  # 1M tokens per optimizer step
micro_batch_size = 4  # per GPU; lower it if you run out of memory, accumulation grows to match
learning_rate = 0.00012
min_lr = 1.2e-05  # cosine decay to 10% of the peak
activation_checkpointing = True
