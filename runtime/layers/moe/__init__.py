"""Mixture-of-experts layers (home of the MoE work): the router (gate linear + softmax/sigmoid scoring), top-k
expert selection with its renormalisation and grouped variants (DeepSeek), and the fused experts (gate/up, SiLU-mul,
down, weighted sum) with a torch reference and a Triton kernel. Each expert-parallel or tensor-parallel split is
owned by the layer, like the dense linears of ``layers/linear.py``. Empty until the MoE issue lands."""
