"""The files one stage writes and another reads, named once. Folders come from params.yaml's `paths:`; these are
the names inside them. A stage never imports another stage for a file name: both read it here."""

# paths.raw, written by ingest
INGEST_REPORT = "ingest_report.json"  # also copied into paths.curated by format (train logs it from there)
RAW_REJECTED = "rejected.jsonl"

# paths.curated, written by format (the split files and the tokenised cache: sftops.data.store)
STATS = "stats.json"
CURATED_REJECTED = "rejected.jsonl"
CARD = "data_card.md"
HISTOGRAM = "token_lengths.png"

# paths.model, written by train
MODEL_DIR = "model"  # the fine-tuned model (adapter or full weights) with its tokenizer
RUN_FILE = "run.json"  # the MLflow run and registered version the model belongs to
TRAIN_CURVE = "train_curve.csv"
VAL_CURVE = "val_curve.csv"
SUITE_CURVE = "suite_curve.csv"  # per suite and validation: forgetting during training (train/forgetting.py)

# paths.reports, written by evaluate (and paths.metrics, its metrics.json)
REPORT_FILE = "report.html"
GENERATIONS_FILE = "generations.csv"
ROWS_FILE = "nll_by_row.csv"
SUITES_DIR = "suites"  # one CSV per regression suite: its sampled generations side by side

# paths.exports, written by export
GGUF_FILE = "model-{quant}.gguf"  # per export.gguf quantisation
MODELFILE = "Modelfile-{quant}"  # Ollama's, for that GGUF file
EXPORT_PARITY = "parity.json"  # each GGUF read back against the evaluated model
VLLM_CHECK = "vllm.json"  # the adapter against vLLM's LoRA rules, and its `vllm serve` line
