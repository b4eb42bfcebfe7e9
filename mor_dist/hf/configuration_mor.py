"""Configuration of a Mixture-of-Recursions model for Hugging Face transformers (trust_remote_code).

`mor export RUN -o OUT --hf` copies this file into OUT beside modeling_mor.py; it needs transformers only.
The standard Llama keys keep their Hugging Face names; the MoR keys mirror mor_dist's config
(model.recursions, model.sharing, model.pad_layers, routing.*, kv.strategy).
"""

from transformers import PreTrainedConfig


class MoRConfig(PreTrainedConfig):
    model_type = "mor"

    vocab_size: int = 49152
    hidden_size: int = 960
    intermediate_size: int = 2560
    # L: the layers of the vanilla model; recursive models derive their layout from it and `sharing`.
    num_hidden_layers: int = 32
    num_attention_heads: int = 15
    num_key_value_heads: int = 5
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Nr and the sharing layout: none | cycle | sequence | middle_cycle | middle_sequence.
    recursions: int = 1
    sharing: str = "none"
    pad_layers: bool = False
    # Routing: none (vanilla / recursive) | expert (expert-choice) | token (token-choice).
    routing_type: str = "none"
    router: str = "linear"  # linear | mlp
    router_alpha: float = 0.1  # gate scale (already resolved from the router's default)
    causal_method: str = "aux_loss"  # aux_router: a second router makes the continue/stop decision
    gating: str = "weighted"  # weighted: h + alpha*sigmoid(logit)*f(h); none: f(h)
    token_func: str = "softmax"  # token-choice: softmax | sigmoid
    balancing: str = "loss"  # token-choice: loss_free adds the router bias when choosing a depth
    # recursion_wise: attention at depth r among tokens that reached r; share: recursion 1's K/V reused.
    kv_strategy: str = "recursion_wise"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)


__all__ = ["MoRConfig"]
