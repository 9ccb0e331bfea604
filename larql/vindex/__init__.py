"""The vindex: one model's weights on disk, split by role, everything mmapped.

CONTRACT (filled in by the vindex work; other modules code against these names).

    vx = open_vindex(path)                 # validates index.json, manifests, layer file headers lazily
    vx.path, vx.index (dict), vx.config (larql.config.ModelConfig), vx.quant ("q4k"|"f16"|"f32")
    vx.norm(key) -> np.ndarray f32         # e.g. "layers.3.input_layernorm.weight", "norm.weight",
                                           # "layers.3.router.proj.weight" (reshaped [E, H]),
                                           # "layers.3.router.scale", "layers.3.router.per_expert_scale",
                                           # "layers.3.layer_scalar" (shape [1])
    vx.has(key) -> bool
    vx.embeddings() -> np.ndarray [vocab, hidden] f16 or f32 (zero-copy view)
    vx.lm_head() -> QMatrix | None          # None = tied to embeddings
    vx.attn(layer) -> AttnWeights(q, k, v, o: QMatrix; v is None when k_eq_v on that layer)
    vx.dense_mlp(layer) -> DenseWeights(gate, up, down: QMatrix)
    vx.expert_file(layer) -> ExpertFile     # raises VindexError naming the file if absent
    vx.layers_present -> list[int]; vx.experts_present -> list[int] (what this slice holds)
    vx.tokenizer_path -> Path | None; vx.chat_template -> str | None
    vx.expert_fingerprint() -> str          # sha256 over index identity + expert-file headers/offset
                                            # tables: equal across shards of one model

    ExpertFile: layer, path, version, quant_format, num_experts, inter, hidden,
        entry(e) -> ExpertEntry(gate_up_off, gate_up_len, down_off, down_len, gate_up_fmt, down_fmt) | None,
        has(e) -> bool, table(experts=None) -> larql.kernels.ExpertTable (only the named experts),
        advise_random(), prefetch(experts) (MADV_WILLNEED), prefault(experts) -> bytes touched,
        resident(experts) -> fraction of pages resident (mincore), close()

    VindexError(ValueError): every bad-input error, naming the file and field.
"""
