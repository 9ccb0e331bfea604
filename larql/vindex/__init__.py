"""The vindex: one model's weights on disk, split by role, everything mmapped.

Layout and decisions: docs/FORMAT.md (the reference's q4k layout, plus our f16/f32 files).

    vindex = open_vindex(path)                 # validates index.json and every manifest (sizes, offsets
                                           # inside their files, shapes vs index.json); maps files
                                           # lazily; LYRW headers/offset tables are validated when a
                                           # layer's ExpertFile is first opened
    vindex.path, vindex.index (dict), vindex.config (larql.config.ModelConfig),
    vindex.quant ("q4k"|"f16"|"f32"), vindex.dtype ("f16"|"f32": the embeddings' dtype),
    vindex.eos_ids (list[int])
    vindex.norm(key) -> np.ndarray f32         # e.g. "layers.3.input_layernorm.weight", "norm.weight",
                                           # "layers.3.router.proj.weight" (reshaped [E, H]),
                                           # "layers.3.router.scale", "layers.3.router.per_expert_scale",
                                           # "layers.3.layer_scalar" (shape [1]),
                                           # "layers.3.self_attn.q_norm.weight" / "k_norm.weight"
    vindex.has(key) -> bool                    # is that vector in norms.bin
    vindex.embeddings() -> np.ndarray [vocab, hidden] f16 or f32 (zero-copy view)
    vindex.lm_head() -> QMatrix | None          # None = tied to embeddings; else lm_head_q4.bin (Q4_K,
                                           # q4k default) or lm_head_q6k.bin; vindex.lm_head_format
    vindex.attn(layer) -> AttnWeights(q, k, v, o: QMatrix; v is None when k_eq_v on that layer)
    vindex.dense_mlp(layer) -> DenseWeights(gate, up, down: QMatrix)
        QMatrix.cols is the stored (padded) row length, logical_cols the model's.
    vindex.expert_file(layer) -> ExpertFile     # raises VindexError naming the file if absent
    vindex.layers_present -> list[int]; vindex.experts_present -> list[int] (what this slice holds)
    vindex.tokenizer_path -> Path | None; vindex.chat_template -> str | None
    vindex.expert_fingerprint() -> str | None   # equal across every slice/shard of one extraction,
                                           # derived from vindex.integrity (recorded digests)
    vindex.integrity -> integrity.Record; vindex.check_intact(layer) (fstat: raises if a file shrank)
    vindex.structure_problems() -> list[str]   # truncated / malformed files, without hashing
    vindex.file_sizes() -> {relative path: bytes}; vindex.close()

    ExpertFile: layer, path, version, quant_format, num_experts, inter, hidden, header, buffer (uint8
        view of the whole mmap; offsets are absolute), size,
        entry(e) -> ExpertEntry(gate_up_off, gate_up_len, down_off, down_len, gate_up_fmt, down_fmt) | None,
        has(e) -> bool, present() -> list[int], gate_up(e)/down(e) -> uint8 views,
        table(experts=None) -> larql.kernels.ExpertTable (only the named experts; None = all held),
        advise_random(), page_ranges(experts=None) -> merged page-aligned [start, end) byte ranges,
        prefetch(experts=None) (MADV_WILLNEED), populate(start, end) (readahead + MADV_POPULATE_READ),
        prefault(experts=None) -> bytes covered, resident(experts=None) / resident_fraction(ranges)
        -> fraction of pages resident (mincore), close()

    VindexError(ValueError): every bad-input error, naming the file and field.

Writing (no torch needed):
    write_vindex(out, config, source, quant="q4k"|"f16"|"f32", tokenizer_json=None, chat_template=None,
                 progress=True, lyrw_version=2, lm_head=None ("tied"|"q4k"|"q6k"; None: q4k for
                 quant q4k, else tied), ...) -> Path      # atomic: OUT.tmp-<pid> then rename
    random_model.random_tensors(config, seed) -> ArraySource   # HF-named f32 tensors (`.tensors`)
    synthetic.write_synthetic_vindex(out, num_layers=2, quant="q4k", seed=0, lm_head=None, **dims) -> Path
    TensorSource protocol: get(key), has(key), expert(layer, e) (keys are HF names minus `model.`).
Reading sources: sources.open_source(path) (HF safetensors dir or .gguf) -> (ModelConfig, TensorSource, info).
Operations: extract.extract(src, out, quant=..., lm_head=...),
    slicing.slice_vindex(src, dst, preset=..., experts=..., layers=...),
    hub.pull(repo, out, preset=...), hub.publish(dir, repo, slices=...),
    report.info(path) -> dict, report.verify(path) -> list of problems (empty = intact).
Integrity: integrity.Verifier(vindex, experts, layers).check(layer) / check_all() /
    start_background(): a server's check of its bytes against the record (docs/FORMAT.md).
"""

from .format import VindexError, parse_ranges
from .reader import AttnWeights, DenseWeights, ExpertFile, Vindex, open_vindex
from .sources import ArraySource, TensorSource
from .writer import write_vindex

__all__ = [
    "ArraySource",
    "AttnWeights",
    "DenseWeights",
    "ExpertFile",
    "TensorSource",
    "Vindex",
    "VindexError",
    "open_vindex",
    "parse_ranges",
    "write_vindex",
]
