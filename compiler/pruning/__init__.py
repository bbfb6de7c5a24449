"""Training-free structured pruning of Llama-family causal LMs (Shen et al., "Search for Efficient LLMs", arXiv 2409.17372).

One idea per module, read top to bottom:

    importance.py   calibration statistics (forward hooks) and channel/head importance scores
    masks.py        the subnet: kept query heads and MLP channels per layer, GQA rules, budgets
    search.py       evolutionary search over subnets (importance-aware init, alpha-mutation)
    reform.py       layer-by-layer least-squares reformation of o_proj/down_proj (closed form, ADMM)
    materialize.py  physically smaller modules; save/load with per-layer widths in config.json
    baselines.py    magnitude, Wanda-sp and FLAP under the same budget and calibration data

Torch and transformers are imported inside functions where a module is also useful without
them (masks and budgets are plain numpy), so importing this package stays cheap.
"""
