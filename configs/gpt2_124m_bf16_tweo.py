# GPT-2 124M, BF16 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_124m_bf16_tweo.py
from configs.sizes.gpt2_124m import *
from configs.modes.bf16_tweo import *

out_dir = 'out/gpt2_124m_bf16_tweo'
wandb_run_name = 'gpt2_124m_bf16_tweo'
