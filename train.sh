#!/usr/bin/env bash
# OREO end to end. Three modes:
#
#   bash train.sh [--out DIR] [--seed S] [--rounds N]
#                       the built-in task on a CPU in minutes, under one folder (default out/demo): data → SFT →
#                       collect → RS / DPO / KTO / OREO-token / OREO-step → test evaluation → diagnostics
#                       (diagnose.py) → table (JSON, SVG). --rounds N: N rounds of collect-with-the-new-policy,
#                       then retrain, for RS and OREO alike. Re-running skips finished stages and resumes an
#                       interrupted one.
#   bash train.sh sweep [--out DIR] [--seed S]
#                       the learning-rate sweep behind the defaults below: every method, the same learning rates,
#                       greedy accuracy on the VALIDATION problems (the test problems choose nothing).
#   bash train.sh agent [--out DIR] [--seed S]
#                       the agent demo (default out/agent): household.py's ALFWorld-style environment; a tiny model
#                       with a word tokenizer → the demonstrator's transcripts → SFT → collect K episodes per task →
#                       RS / DPO / OREO-token / OREO-step → greedy and best-of-K on the seen and unseen tasks → table.
#   bash train.sh agent-sweep [--out DIR] [--seed S]
#                       the agent demo's learning-rate sweep (shares SFT and collect with `agent` in the same DIR):
#                       every method at the same learning rates, greedy success on the VALIDATION tasks.
#   bash train.sh real  the commands for a real run (print only; edit the paths, then run them yourself)
#
# Every oreo.py run writes DIR/<run>/ckpt.pt, log.jsonl (one JSON row per step), and at the end policy/ and value/
# (Hugging Face folders that search.py and transformers load). Logs of every stage: DIR/logs/<stage>.log.
set -euo pipefail
cd "$(dirname "$0")"

MODE=builtin
case "${1:-}" in real|sweep|agent|agent-sweep) MODE=$1; shift ;; esac

if [ "$MODE" = real ]; then
cat <<'EOF'
# ---- A real run: Qwen2.5-Math-1.5B (SFT'd) on GSM8K/MATH-style trajectories, the paper's settings -------------
# β 0.03, α 0.01 (token level), lr 5e-6 for both models, AdamW (0.9, 0.95), cosine with 3% warm-up, global batch
# 128 sequences, 1 epoch, max length 2048, bf16 — all defaults of oreo.py with --init. The baselines' paper learning
# rates are their defaults too (sft 2e-5, rs 5e-6, dpo 5e-7, kto 5e-8); each run prints its settings first.
SFT=ckpt/qwen2.5-math-1.5b-sft      # a Hugging Face folder: config.json, *.safetensors, tokenizer files
DATA=data/math_train_k10.jsonl      # {prompt, response, reward} rows, e.g. from search.py collect

# Offline data: 10 samples per problem at temperature 1.0, top-p 0.95, graded (one process per GPU).
torchrun --standalone --nproc_per_node=8 search.py collect --policy $SFT --problems data/math_train.jsonl \
    --prompt-style qwen-math -k 10 --temperature 1.0 --top-p 0.95 --max-new-tokens 1024 --out $DATA

# One node, 8 GPUs (DDP): 128 = 4 sequences × 4 accumulation steps × 8 GPUs (the micro-batch defaults to 4,
# fewer when 128 / processes is smaller).
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --delimiters math \
    --micro-batch-size 4 --grad-checkpointing --out out/oreo-1.5b

# Two nodes × 8 GPUs: run the same command on both, node_rank 0 and 1; MASTER is node 0's address.
# All nodes must see the same --out folder (a shared file system): rank 0 writes, every rank reads on --resume.
torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
    oreo.py --init $SFT --data $DATA --delimiters math --micro-batch-size 4 --grad-checkpointing --out out/oreo-1.5b
torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
    oreo.py --init $SFT --data $DATA --delimiters math --micro-batch-size 4 --grad-checkpointing --out out/oreo-1.5b

# 7B (DeepSeekMath-7B-Instruct) does not fit replicated: shard the three models with FSDP2; the paper's critic is
# LoRA rank 64 (α 64) at lr 1e-4 (the --value-lora default), 2 epochs; value/ is written merged, a normal folder.
torchrun --standalone --nproc_per_node=8 oreo.py --init ckpt/deepseekmath-7b-instruct --data $DATA --fsdp \
    --grad-checkpointing --micro-batch-size 2 --value-lora 64 --value-lr 1e-4 --epochs 2 --out out/oreo-7b

# Step-level OREO (α 0.1) as the paper ran it (--step-start official: the official segmentation, the value trained
# at step starts only), and the baselines on the same data (lr: rs 5e-6, dpo 5e-7, kto 5e-8 by default).
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --variant step --delimiters math \
    --step-start official --out out/oreo-step
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --loss rs  --out out/rs
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --loss dpo --out out/dpo
torchrun --standalone --nproc_per_node=8 oreo.py --init $SFT --data $DATA --loss kto --out out/kto

# A preempted job: the same command with --resume continues exactly where ckpt.pt left off.
# Evaluate: greedy with the policy, and value-guided step beam search (paper: B = 7 best).
python search.py eval --policy out/oreo-1.5b/policy --value out/oreo-1.5b/value --problems data/math500.jsonl \
    --prompt-style qwen-math --delimiters math --methods greedy,beam7 --max-new-tokens 1024
EOF
exit 0
fi

# ---- Settings (environment variables; the flags below override three of them) --------------------------------
[ "$MODE" = agent ] || [ "$MODE" = agent-sweep ] && OUT=${OUT:-out/agent}
OUT=${OUT:-out/demo}
SEED=${SEED:-0}
ROUNDS=${ROUNDS:-1}                  # iterative RS and OREO: rounds of collect-with-the-new-policy, then retrain
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        *) echo "train.sh: unknown argument '$1' (use real, sweep, agent, agent-sweep, --out DIR, --seed S, --rounds N)" >&2
           exit 2 ;;
    esac
done
N_TRAIN=${N_TRAIN:-400} N_VAL=${N_VAL:-200} N_TEST=${N_TEST:-1000}   # problems per split
N_OPS=${N_OPS:-6}                    # operations (solution steps) per problem
DEMOS=${DEMOS:-4}                    # imperfect demonstrations per training problem (SFT data)
SFT_EPOCHS=${SFT_EPOCHS:-24}         # d_model 128: the loss nears the demonstrations' entropy floor (diagnose.py)
K=${K:-4}                            # graded samples per training problem: the offline data of every method
STEPS=${STEPS:-200}                  # optimizer steps of each offline method, batch 32 sequences (pairs for DPO)
BATCH=${BATCH:-32}
BEAMS=${BEAMS:-3}                    # beam widths of the value-guided beam search with OREO's policy
SFT_BEAMS=${SFT_BEAMS:-3}            # ... and with the SFT policy (each also with random scores: the control)
BEAM_PROBLEMS=${BEAM_PROBLEMS:-300}  # the first test problems that beam search runs on
DIAG_PROBLEMS=${DIAG_PROBLEMS:-500}  # the first test problems diagnose.py samples K times each
MODEL=${MODEL:-"--n-layer 4 --d-model 128 --n-head 4"}
# Learning rates: the best greedy accuracy on the 200 validation problems of the seed-0 sweep (bash train.sh
# sweep, 2026-12-02, 8 rates per method; docs/demo_sweep.json): RS 1e-4, DPO 1e-5, KTO 3e-6, OREO-token 1e-3,
# OREO-step 3e-4 (value lr 1e-3 throughout). LR_OREO_SEARCH: OREO-token's rate with the best value-guided beam
# search (B = 3) on the same problems, from the same 8 runs.
LR_RS=${LR_RS:-1e-4} LR_DPO=${LR_DPO:-1e-5} LR_KTO=${LR_KTO:-3e-6} LR_OREO=${LR_OREO:-1e-3}
LR_OREO_STEP=${LR_OREO_STEP:-3e-4} LR_OREO_SEARCH=${LR_OREO_SEARCH:-3e-5}
VALUE_LR=${VALUE_LR:-1e-3}           # OREO's value model (both variants)
SWEEP_LRS=${SWEEP_LRS:-"1e-6 3e-6 1e-5 3e-5 1e-4 3e-4 1e-3 3e-3"}
# Two processes at a time with one thread each: on 2 shared cores this beats one process with two threads.
PARALLEL=${PARALLEL:-2}
# The thread count is part of the result: float sums split over 2 threads round differently than over 1, so it
# is set here, never inherited (so is the CPU's instruction set: another CPU model gives other numbers).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SFT_THREADS=${SFT_THREADS:-2}        # SFT runs alone: two threads are faster on idle cores, one on busy ones

D=$OUT/data
TRAIN=(--batch-size $BATCH --micro-batch-size $BATCH --max-steps $STEPS --seed $SEED --save-every 50 --resume)
EVAL=(--max-new-tokens 64 --seed $SEED --batch-size 256)
mkdir -p "$OUT/logs" "$OUT/.done" "$OUT/eval"

# ---- Stages: each one a function; a stage that finished (OUT/.done/NAME) is skipped on a re-run -----------------
stage_data() { python data.py builtin $D --seed $SEED --n-train $N_TRAIN --n-val $N_VAL --n-test $N_TEST \
                   --n-steps $N_OPS --demos-per-problem $DEMOS; }
stage_sft() { OMP_NUM_THREADS=$SFT_THREADS MKL_NUM_THREADS=$SFT_THREADS python oreo.py --loss sft \
                  --data $D/demos.jsonl --epochs $SFT_EPOCHS --lr 1e-3 $MODEL \
                  --batch-size $BATCH --micro-batch-size $BATCH --seed $SEED --save-every 200 --resume --out $OUT/sft; }
# round r's offline data: K graded samples per training problem from the SFT policy (r = 1, shared by every method)
# or from the method's round r-1 policy (collect POLICY ROUND FILE)
collect() { python search.py collect --policy $1 --problems $D/problems_train.jsonl -k $K --max-new-tokens 64 \
                --seed $((SEED + 1000 * ($2 - 1))) --out $3; }
stage_collect() { collect $OUT/sft/policy 1 $D/samples_r1.jsonl; }
train() { local name=$1; shift; python oreo.py --init $OUT/sft/policy --data $D/samples_r1.jsonl "${TRAIN[@]}" \
              --out $OUT/$name "$@"; }
stage_rs() { train rs --loss rs --lr $LR_RS; }
stage_dpo() { train dpo --loss dpo --lr $LR_DPO; }
stage_kto() { train kto --loss kto --lr $LR_KTO; }
stage_oreo() { train oreo --lr $LR_OREO --value-lr $VALUE_LR; }
stage_oreo_step() { train oreo_step --variant step --lr $LR_OREO_STEP --value-lr $VALUE_LR; }
stage_oreo_search() { train oreo_search --lr $LR_OREO_SEARCH --value-lr $VALUE_LR; }
evaluate() { local name=$1; shift; python search.py eval --problems $D/problems_test.jsonl "${EVAL[@]}" "$@" \
                 --out $OUT/eval/$name.json; }
stage_eval_sft() { evaluate sft --policy $OUT/sft/policy --methods greedy,sample; }
stage_eval_rs() { evaluate rs --policy $OUT/rs/policy --methods greedy; }
stage_eval_dpo() { evaluate dpo --policy $OUT/dpo/policy --methods greedy; }
stage_eval_kto() { evaluate kto --policy $OUT/kto/policy --methods greedy; }
stage_eval_oreo() { evaluate oreo --policy $OUT/oreo/policy --methods greedy; }
stage_eval_oreo_step() { evaluate oreo_step --policy $OUT/oreo_step/policy --methods greedy; }
# Beam search costs ~B² samples per step, so it runs on the first BEAM_PROBLEMS test problems (the table also
# counts greedy on exactly those). The SFT policy searched with OREO's value isolates what the value adds; the same
# search with random scores (randbeamB) is its control.
beam() { echo "$1" | sed 's/^/beam/; s/,/,beam/g'; }   # "3,5" -> "beam3,beam5"
stage_beam_oreo() { evaluate beam_oreo --policy $OUT/oreo/policy --value $OUT/oreo/value --methods $(beam $BEAMS) \
                        --limit $BEAM_PROBLEMS; }
# greedy and value beam of one OREO run on the same problems (eval_beam NAME RUN): OREO-token at the rate chosen
# for beam search, and each round's OREO
eval_beam() { evaluate $1 --policy $OUT/$2/policy --value $OUT/$2/value --methods greedy,$(beam $BEAMS) \
                  --limit $BEAM_PROBLEMS; }
stage_beam_oreo_search() { eval_beam oreo_search oreo_search; }
stage_beam_sft() { evaluate beam_sft --policy $OUT/sft/policy --value $OUT/oreo/value --limit $BEAM_PROBLEMS \
                       --methods $(beam $SFT_BEAMS),$(beam $SFT_BEAMS | sed 's/beam/randbeam/g'); }
# how well the value tells right from wrong: choose 1 of K SFT samples by the value, against chance and the best
stage_choice() { evaluate choice --policy $OUT/sft/policy --value $OUT/oreo/value --methods bestof$K; }
# has SFT learnt what it was shown, how many positives are lucky, does OREO's value drop at the wrong step
stage_diagnose() { python diagnose.py $OUT --limit $DIAG_PROBLEMS -k $K --seed $SEED; }
# iterative RS and OREO, round r ≥ 2 (the same K samples per problem each round): collect with the method's round
# r-1 policy, continue training from it (OREO: from its policy and value)
prev() { if [ $2 -eq 2 ]; then echo $OUT/$1; else echo $OUT/$1_r$(($2 - 1)); fi; }   # prev METHOD ROUND
stage_collect_r() { collect $(prev $1 $2)/policy $2 $D/samples_$1_r$2.jsonl; }        # stage_collect_r METHOD ROUND
stage_rs_r() { python oreo.py --loss rs --init $(prev rs $1)/policy --data $D/samples_rs_r$1.jsonl "${TRAIN[@]}" \
                   --lr $LR_RS --out $OUT/rs_r$1; }
stage_oreo_r() { python oreo.py --init $(prev oreo $1)/policy --init-value $(prev oreo $1)/value \
                     --data $D/samples_oreo_r$1.jsonl "${TRAIN[@]}" --lr $LR_OREO --value-lr $VALUE_LR \
                     --out $OUT/oreo_r$1; }
stage_eval_r() { evaluate $1_r$2 --policy $OUT/$1_r$2/policy --methods greedy; }     # stage_eval_r METHOD ROUND
stage_beam_r() { eval_beam beam_oreo_r$1 oreo_r$1; }                                   # stage_beam_r ROUND
# sweep: one run per (method, learning rate), greedy accuracy on the validation problems
stage_sweep() { local method=$1 lr=$2 flags=(--lr $2) name=sweep/$1-lr$2
    case $method in rs|dpo|kto) flags+=(--loss $method) ;; oreo) flags+=(--value-lr $VALUE_LR) ;;
                    oreo_step) flags+=(--variant step --value-lr $VALUE_LR) ;; esac
    train $name "${flags[@]}"
    python search.py eval --problems $D/problems_val.jsonl "${EVAL[@]}" --policy $OUT/$name/policy \
        --methods greedy --out $OUT/$name.json; }
# ... and OREO's own test-time method: value-guided beam search with its policy and value, on the same problems
stage_sweep_beam() { local name=$1-lr$2
    python search.py eval --problems $D/problems_val.jsonl "${EVAL[@]}" --policy $OUT/sweep/$name/policy \
        --value $OUT/sweep/$name/value --methods $(beam $BEAMS) --out $OUT/sweep/beam/$name.json; }

# ---- A small scheduler: PARALLEL stages at a time, each once its dependencies are done ----------------------
set -m
T0=$(date +%s)
declare -A DEPS PIDS STARTED
ORDER=() RUNNING=0
job() { ORDER+=("$1"); DEPS[$1]="${*:2}"; }   # job NAME [DEPENDENCY ...]; NAME "oreo_r 2" runs stage_oreo_r 2
done_file() { echo "$OUT/.done/${1// /_}"; }
n_done() { local name n=0; for name in "${ORDER[@]}"; do [ -e "$(done_file "$name")" ] && n=$((n + 1)); done; echo $n; }
# the CPU seconds (user + system) of a stage's processes, from the second line of what `times` wrote
cpu_s() { tail -1 "$OUT/logs/${1// /_}.log.cpu" |
              awk '{ split($1, u, "m"); split($2, s, "m"); printf "%.0f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }'; }
elapsed() { local s=$(($(date +%s) - T0)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
# terminal: every line of a stage, except its training steps only every 25th (the full log is in OUT/logs)
show() { awk -v tag="[$1]" '$1 == "step" { split($2, n, "/"); if (n[1] % 25 && n[1] != n[2]) next }
                             { print tag, $0; fflush() }'; }
start() {
    local log=$OUT/logs/${1// /_}.log
    echo "== $(elapsed) start $1 (log $log)"
    # log.cpu: the stage's CPU seconds (user, system), which other jobs on the same cores inflate far less than
    # its wall time
    ( set -o pipefail; rc=0; stage_$1 2>&1 | tee "$log" | show "$1" || rc=$?
      times > "$log.cpu"; [ $rc = 0 ] && touch "$(done_file "$1")"; exit $rc ) &
    PIDS[$1]=$!; STARTED[$1]=$(date +%s); RUNNING=$((RUNNING + 1))
}
run_all() {
    local name dep ready count
    # each stage runs in its own process group (set -m), so an interrupted train.sh stops all of its processes
    trap 'for pid in ${PIDS[*]:-}; do kill -- -$pid 2>/dev/null; done' EXIT
    while true; do
        for name in "${!PIDS[@]}"; do
            if ! kill -0 ${PIDS[$name]} 2>/dev/null; then
                wait ${PIDS[$name]} || { echo "train.sh: stage '$name' failed; see $OUT/logs/${name// /_}.log" >&2
                                         exit 1; }
                unset "PIDS[$name]"; RUNNING=$((RUNNING - 1))
                echo "== $(elapsed) done $name in $(($(date +%s) - STARTED[$name])) s (CPU $(cpu_s "$name") s) |" \
                     "$(n_done)/${#ORDER[@]} stages"
            fi
        done
        count=$(n_done)
        [ $count -eq ${#ORDER[@]} ] && break
        for name in "${ORDER[@]}"; do
            [ $RUNNING -ge $PARALLEL ] && break
            [ -e "$(done_file "$name")" ] || [ -n "${PIDS[$name]:-}" ] && continue
            ready=1
            for dep in ${DEPS[$name]}; do [ -e "$(done_file "${dep//:/ }")" ] || ready=0; done
            [ $ready = 1 ] && start "$name"
        done
        sleep 0.5
    done
    trap - EXIT
}

# ---- The agent demo: agent.py and household.py (README, "The agent demo") ----------------------------------------
if [ "$MODE" = agent ] || [ "$MODE" = agent-sweep ]; then
    A_TRAIN=${A_TRAIN:-600} A_DEMOS=${A_DEMOS:-4}  # training tasks (all of them); demonstrations per task (SFT data)
    A_EVAL=${A_EVAL:-0}                            # evaluation tasks per split (0: all, 140 seen and 134 unseen)
    A_VAL=${A_VAL:-140}                            # validation tasks of the sweep (agent-sweep)
    A_MAX_STEPS=${A_MAX_STEPS:-20}                 # actions per episode (paper: 40; our expert plans are 4-9 long)
    A_K=${A_K:-3}                                  # episodes per training task from the SFT policy
    A_BEST_OF=${A_BEST_OF:-3}                      # candidate actions per turn for value-guided best-of-K (paper: 3)
    A_SFT_EPOCHS=${A_SFT_EPOCHS:-10} A_SFT_LR=${A_SFT_LR:-3e-3} A_SFT_BATCH=${A_SFT_BATCH:-16} A_SFT_PROCS=${A_SFT_PROCS:-2}
    A_STEPS=${A_STEPS:-60} A_BATCH=${A_BATCH:-16}  # optimizer steps and batch (sequences) of RS, DPO, OREO
    A_MAX_LEN=${A_MAX_LEN:-512} A_MODEL=${A_MODEL:-"--n-layer 4 --d-model 128 --n-head 4"}
    # Learning rates: the best greedy success on the 140 val tasks of the seed-0 agent-sweep (2026-12-02; every
    # method at 1e-5, 1e-4, 1e-3; docs/agent_sweep.json): 1e-5 for all four, the grid's lower edge.
    A_LR_RS=${A_LR_RS:-1e-5} A_LR_DPO=${A_LR_DPO:-1e-5} A_LR_OREO=${A_LR_OREO:-1e-5}
    A_LR_OREO_STEP=${A_LR_OREO_STEP:-1e-5} A_VALUE_LR=${A_VALUE_LR:-1e-3}
    A_SWEEP_LRS=${A_SWEEP_LRS:-"1e-5 1e-4 1e-3"}   # agent-sweep: every method at each, greedy success on val
    ENVARGS=(--seed $SEED --max-steps $A_MAX_STEPS)
    A_TRAIN_ARGS=(--max-len $A_MAX_LEN --batch-size $A_BATCH --micro-batch-size $A_BATCH --max-steps $A_STEPS
                  --seed $SEED --save-every 50 --resume)
    # episodes differ in length (4 to 20 turns): RS and DPO take batches of similar lengths (real/padded tokens
    # 0.685 -> 0.989). OREO does not: such batches are nearly all failures (long) or all successes (short), and the
    # value fitted on them ranked actions worse (seed 0, val, best-of-3 at T 0.5: 0.293 grouped, 0.364 not; README)
    A_GROUPED=(--group-by-length)
    stage_agent_init() { python agent.py init "${ENVARGS[@]}" $A_MODEL --max-len $A_MAX_LEN --out $OUT/init; }
    stage_agent_demos() { python agent.py demos "${ENVARGS[@]}" --tasks $A_TRAIN --per-task $A_DEMOS \
                              --out $D/demos.jsonl; }
    # SFT alone has the machine: torchrun's A_SFT_PROCS processes of one thread each (DDP; 2 on 2 cores: 1.9-2.0× the
    # tokens/s of one process, the same loss to 4 digits; README, "Time of one seed")
    stage_agent_sft() { torchrun --standalone --nproc_per_node $A_SFT_PROCS oreo.py --loss sft --init $OUT/init \
                            --data $D/demos.jsonl --max-len $A_MAX_LEN --epochs $A_SFT_EPOCHS --lr $A_SFT_LR \
                            --batch-size $A_SFT_BATCH --micro-batch-size $((A_SFT_BATCH / A_SFT_PROCS)) \
                            --group-by-length --seed $SEED --save-every 100 --resume --out $OUT/sft; }
    stage_agent_collect() { python agent.py collect "${ENVARGS[@]}" --policy $OUT/sft/policy -k $A_K --tasks $A_TRAIN \
                                --out $D/episodes.jsonl; }
    a_train() { local name=$1; shift; python oreo.py --init $OUT/sft/policy --data $D/episodes.jsonl \
                    "${A_TRAIN_ARGS[@]}" --out $OUT/$name "$@"; }
    stage_agent_rs() { a_train rs --loss rs --lr $A_LR_RS "${A_GROUPED[@]}"; }
    stage_agent_dpo() { a_train dpo --loss dpo --lr $A_LR_DPO "${A_GROUPED[@]}"; }
    stage_agent_oreo() { a_train oreo --lr $A_LR_OREO --value-lr $A_VALUE_LR; }
    stage_agent_oreo_step() { a_train oreo_step --variant step --lr $A_LR_OREO_STEP --value-lr $A_VALUE_LR; }
    # a_eval NAME[:FILE]: NAME's policy, its results in eval/FILE.json (default eval/NAME.json)
    a_eval() { local name=${1%%:*} file=${1##*:}; shift; python agent.py eval "${ENVARGS[@]}" --tasks $A_EVAL \
                   --policy $OUT/$name/policy --out $OUT/eval/$file.json "$@"; }
    stage_agent_eval_sft() { a_eval sft --methods greedy; }
    stage_agent_eval_rs() { a_eval rs --methods greedy; }
    stage_agent_eval_dpo() { a_eval dpo --methods greedy; }
    # best-of-K picks among K actions sampled at --temperature: "sample" (one such action per turn) is its control
    stage_agent_eval_oreo() { a_eval oreo --value $OUT/oreo/value --methods greedy,sample,bestof$A_BEST_OF; }
    stage_agent_eval_oreo_step() { a_eval oreo_step --value $OUT/oreo_step/value --methods greedy,sample,bestof$A_BEST_OF; }
    # the same at T 0.5, chosen on val (seed 0: best-of-3 0.279 against 0.193 at T 1 and greedy 0.257; README)
    stage_agent_eval_oreo_t05() { a_eval oreo:oreo_t05 --value $OUT/oreo/value \
                                      --methods sample,bestof$A_BEST_OF --temperature 0.5; }
    # agent-sweep: one run per (method, learning rate), greedy success on the val split (the test splits choose
    # nothing); OREO's value lr stays A_VALUE_LR
    stage_agent_sweep() { local method=$1 lr=$2 flags=(--lr $2) name=sweep/$1-lr$2
        case $method in rs|dpo) flags+=(--loss $method "${A_GROUPED[@]}") ;; oreo) flags+=(--value-lr $A_VALUE_LR) ;;
                        oreo_step) flags+=(--variant step --value-lr $A_VALUE_LR) ;; esac
        a_train $name "${flags[@]}"
        python agent.py eval "${ENVARGS[@]}" --splits val --tasks $A_VAL --policy $OUT/$name/policy \
            --methods greedy --out $OUT/$name.json; }
    job agent_init
    job agent_demos
    job agent_sft agent_init agent_demos
    job agent_collect agent_sft
    if [ "$MODE" = agent-sweep ]; then
        for lr in $A_SWEEP_LRS; do for method in oreo oreo_step dpo rs; do
            job "agent_sweep $method $lr" agent_collect; done; done
        echo "== train.sh agent-sweep: seed $SEED, $PARALLEL stages at a time, output in $OUT"
        run_all
        python report.py sweep $OUT
        exit 0
    fi
    job agent_eval_sft agent_sft
    for name in oreo oreo_step rs dpo; do
        job agent_$name agent_collect
        job agent_eval_$name agent_$name
    done
    job agent_eval_oreo_t05 agent_oreo
    echo "== train.sh agent: seed $SEED, $PARALLEL stages at a time, output in $OUT"
    run_all
    python report.py agent $OUT
    echo "== $(elapsed) all done: $OUT/results.json, $OUT/results.svg"
    exit 0
fi

job data
job sft data
job collect sft
if [ "$MODE" = sweep ]; then
    for lr in $SWEEP_LRS; do for method in oreo oreo_step dpo kto rs; do job "sweep $method $lr" collect; done; done
    for lr in $SWEEP_LRS; do for method in oreo oreo_step; do
        job "sweep_beam $method $lr" "sweep:$method:$lr"; done; done
    run_all
    python report.py sweep $OUT
    exit 0
fi
# the headline rows first (so that an interrupted run already has them), beam search early (it is the longest)
job oreo collect
job rs collect
job beam_sft oreo
job diagnose oreo
job eval_sft sft
job eval_rs rs
job eval_oreo oreo
job choice oreo
job beam_oreo oreo
job oreo_step collect
job dpo collect
job kto collect
job eval_oreo_step oreo_step
job eval_dpo dpo
job eval_kto kto
job oreo_search collect
job beam_oreo_search oreo_search
for r in $(seq 2 $ROUNDS); do
    for method in oreo rs; do
        job "collect_r $method $r" $([ $r -eq 2 ] && echo $method || echo "${method}_r:$((r - 1))")
        job "${method}_r $r" "collect_r:$method:$r"
        job "eval_r $method $r" "${method}_r:$r"
    done
    job "beam_r $r" "oreo_r:$r"
done
echo "== train.sh: the built-in task, seed $SEED, $ROUNDS round(s), $PARALLEL stages at a time, output in $OUT"
run_all
python report.py $OUT
echo "== $(elapsed) all done: $OUT/results.json, $OUT/results.svg"
