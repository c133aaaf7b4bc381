# naive FP8: every Linear and LayerNorm, LM head included, under per-tensor delayed scaling
precision = 'fp8'
tweo_lambda = 0.0
