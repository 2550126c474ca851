#!/usr/bin/env bash
# OREO end to end. Two parts:
#
#   bash train.sh            the built-in task on a CPU, in minutes: data → SFT → collect → OREO / RS / DPO → eval
#   bash train.sh real       the commands for a real run (print only; edit the paths, then run them yourself)
#
# Every oreo.py run writes OUT/ckpt.pt (resume with --resume, also on another number of processes),
# OUT/log.jsonl (one JSON row per step), and at the end OUT/policy and OUT/value (Hugging Face folders that
# search.py and transformers load).
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-builtin}" = "real" ]; then
cat <<'EOF'
# ---- A real run: Qwen2.5-Math-1.5B (SFT'd) on GSM8K/MATH-style trajectories, the paper's settings -------------
# β 0.03, α 0.01 (token level), lr 5e-6 for both models, AdamW (0.9, 0.95), cosine with 3% warm-up, global batch
# 128 sequences, 1 epoch, max length 2048, bf16 — all defaults of oreo.py with --init.
SFT=ckpt/qwen2.5-math-1.5b-sft      # a Hugging Face folder: config.json, *.safetensors, tokenizer files
DATA=data/math_train_k10.jsonl      # {prompt, response, reward} rows, e.g. from search.py collect

# Offline data: 10 samples per problem at temperature 1.0, top-p 0.95, graded (one process per GPU).
torchrun --standalone --nproc_per_node=8 search.py collect --policy $SFT --problems data/math_train.jsonl \
    --prompt-style qwen-math -k 10 --temperature 1.0 --top-p 0.95 --max-new-tokens 1024 --out $DATA

# One node, 8 GPUs (DDP): 128 = 4 sequences × 4 accumulation steps × 8 GPUs.
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --delimiters math \
    --micro-batch-size 4 --grad-checkpointing --out out/oreo-1.5b

# Two nodes × 8 GPUs: run the same command on both, node_rank 0 and 1; MASTER is node 0's address.
# All nodes must see the same --out folder (a shared file system): rank 0 writes, every rank reads on --resume.
torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
    oreo.py --init $SFT --data $DATA --delimiters math --micro-batch-size 4 --grad-checkpointing --out out/oreo-1.5b
torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
    oreo.py --init $SFT --data $DATA --delimiters math --micro-batch-size 4 --grad-checkpointing --out out/oreo-1.5b

# 7B (DeepSeekMath-7B) does not fit replicated: shard the three models with FSDP2; the paper's critic lr 1e-4, 2 epochs.
torchrun --standalone --nproc_per_node=8 oreo.py --init ckpt/deepseekmath-7b-sft --data $DATA --fsdp \
    --grad-checkpointing --micro-batch-size 2 --value-lr 1e-4 --epochs 2 --out out/oreo-7b

# Step-level OREO (α 0.1) and the baselines on the same data.
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --variant step --delimiters math \
    --out out/oreo-step
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --loss rs  --out out/rs
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --loss dpo --out out/dpo

# A preempted job: the same command with --resume continues exactly where ckpt.pt left off.
# Evaluate: greedy with the policy, and value-guided step beam search (paper: B = 7 best).
python search.py eval --policy out/oreo-1.5b/policy --value out/oreo-1.5b/value --problems data/math500.jsonl \
    --prompt-style qwen-math --delimiters math --methods greedy,beam7 --max-new-tokens 1024
EOF
exit 0
fi

# ---- The built-in task (DESIGN.md §5): "7 +6 -6 +4 -1 +5 *8" → one step per line, "#### n" ----------------------
# Tiny Llama-family model (≈0.47M parameters), byte tokenizer, everything on the CPU. The demonstrator misreads '*'
# as '+' with probability 0.7 and its lines show the operator it used, so a value model can check the steps.
OUT=${OUT:-out/builtin}
SEED=${SEED:-0}
STEPS=${STEPS:-200}                  # optimizer steps of each offline method
# On a CPU shared with other busy jobs, OMP_NUM_THREADS=1 can be several times faster than the default.

# 1. Problems (train/val/test) and imperfect demonstrations.
python data.py builtin $OUT/data --seed $SEED --demos-per-problem 4

# 2. SFT from scratch on all demonstrations (the reference policy of everything after).
python oreo.py --loss sft --data $OUT/data/demos.jsonl --epochs 16 --lr 1e-3 --seed $SEED --out $OUT/sft

# 3. Offline data: 4 graded samples per training problem from the SFT policy.
python search.py collect --policy $OUT/sft/policy --problems $OUT/data/problems_train.jsonl -k 4 \
    --max-new-tokens 64 --seed $SEED --out $OUT/data/samples.jsonl

# 4. OREO and the baselines on the same samples, the same budget (tune each on problems_val.jsonl).
python oreo.py --init $OUT/sft/policy --data $OUT/data/samples.jsonl --max-steps $STEPS --lr 3e-4 --value-lr 1e-3 \
    --batch-size 32 --micro-batch-size 32 --seed $SEED --out $OUT/oreo
python oreo.py --init $OUT/sft/policy --data $OUT/data/samples.jsonl --max-steps $STEPS --loss rs --lr 5e-5 \
    --batch-size 32 --micro-batch-size 32 --seed $SEED --out $OUT/rs
python oreo.py --init $OUT/sft/policy --data $OUT/data/samples.jsonl --max-steps $STEPS --loss dpo --lr 5e-5 \
    --batch-size 32 --micro-batch-size 32 --seed $SEED --out $OUT/dpo

# 5. Test accuracy: greedy for every policy; beam search guided by OREO's value, with OREO's and with the SFT
#    policy (the second isolates what the value adds).
for run in sft rs dpo oreo; do
    echo "== $run"
    python search.py eval --policy $OUT/$run/policy --problems $OUT/data/problems_test.jsonl --methods greedy \
        --max-new-tokens 64
done
for policy in oreo sft; do
    echo "== beam search: $policy policy, OREO value"
    python search.py eval --policy $OUT/$policy/policy --value $OUT/oreo/value \
        --problems $OUT/data/problems_test.jsonl --methods beam3 --max-new-tokens 64
done
