# GPT-2 124M, BF16 baseline. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_124m_bf16.py
from configs.sizes.gpt2_124m import *
from configs.modes.bf16 import *

out_dir = 'out/gpt2_124m_bf16'
wandb_run_name = 'gpt2_124m_bf16'
