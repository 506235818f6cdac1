"""Configuration of a MoSE (Mixture of Slimmable Experts) model exported by MoSE-DS."""

from transformers import PretrainedConfig


class MoSEConfig(PretrainedConfig):
    """The architecture (`family`: "gpt2" or "deepseek_v2", whose HF config travels in `hf`),
    the routing, the trained width range and grid, the calibrated gamma tables, and the
    default `width_policy` (a dict: {"kind": "full"} | {"kind": "uniform", "width": w} |
    {"kind": "normprob", "budget": G, "gamma": g} | {"kind": "gamma", "budget": G,
    "gamma_mode": "layerwise" | "shared"}, each optionally with "top_k": k')."""

    model_type = "mose"

    def __init__(self, family="gpt2", vocab_size=50304, hidden_size=384, num_layers=6, num_heads=6,
                 ffn_hidden=1536, expert_hidden=1536, shared_hidden=0, seq_len=1024, moe_offset=0, moe_every=2,
                 activation="gelu", layernorm_eps=1e-5, tie_embeddings=True, num_experts=8, routed_top_k=2,
                 router_scores="topk_softmax", router_normalize=True, router_scale=1.0, width_quantum=1,
                 shared_slimmable=False, width_min=0.25, width_max=1.0, grid=None, gamma_table=None,
                 width_policy=None, hf=None, **kwargs):
        self.family, self.vocab_size, self.hidden_size = family, vocab_size, hidden_size
        self.num_layers, self.num_heads, self.ffn_hidden, self.expert_hidden = num_layers, num_heads, ffn_hidden, expert_hidden
        self.shared_hidden, self.seq_len, self.moe_offset, self.moe_every = shared_hidden, seq_len, moe_offset, moe_every
        self.activation, self.layernorm_eps, self.tie_embeddings = activation, layernorm_eps, tie_embeddings
        self.num_experts, self.routed_top_k = num_experts, routed_top_k   # (top_k would be read as sampling's)
        self.router_scores, self.router_normalize, self.router_scale = router_scores, router_normalize, router_scale
        self.width_quantum, self.shared_slimmable = width_quantum, shared_slimmable
        self.width_min, self.width_max, self.grid = width_min, width_max, grid
        self.gamma_table = gamma_table
        self.width_policy = width_policy or {"kind": "full"}
        self.hf = hf or {}
        kwargs["tie_word_embeddings"] = False        # the model ties its own head (no HF tying)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)
        self.num_hidden_layers = num_layers
        self.num_attention_heads = num_heads
        self.max_position_embeddings = self.hf.get("max_position_embeddings", seq_len) if family == "deepseek_v2" \
            else seq_len
