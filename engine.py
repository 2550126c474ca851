"""The generation engine behind search.py: sampling with a KV cache, and the caches that value-guided search keeps.

Sampling: prompts of any lengths share one batch; prefill writes them into the model's KV cache, then one decode
step per token. Each row stops on EOS, on a stop string (matched on the bytes of the tokens, so "\\n" is found also
inside a token like ".\\n\\n", and ". " across two tokens), at a step delimiter (beam search) or at its token limit;
finished rows leave the batch. `generate_naive` (a full forward per token) is kept beside it as the reference the
tests compare with.

Search: `CachedBeams` keeps the policy's and the value model's KV caches of the open beams across the expansions
of a beam search, and `cached_values` gives best-of-K the value of each sample for the price of its new tokens;
search.py keeps the full-recompute versions as the references they are tested against.
"""
import torch

from model import ValueModel

# ----------------------------------------------------------------------------------------------------------
# Sampling


def right_padded(lists, device, width=None):
    """Token lists as one (B, width) long tensor, each row padded with 0 on the right (width: the longest list).
    Causal attention never looks ahead, so right padding needs no mask for the real tokens."""
    width = max(len(t) for t in lists) if width is None else width
    return torch.tensor([t + [0] * (width - len(t)) for t in lists], device=device)


def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Next tokens (B,) from logits (B, V). temperature 0 = argmax; top_k 0 and top_p 1 switch those filters off."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first one always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # argmax(p / E) with E ~ Exp(1) is a sample from p (the exponential race, as in gpt-fast); unlike
    # torch.multinomial it never synchronises with the GPU. E is kept above 0 so a filtered token (p = 0) never
    # becomes 0/0 = NaN, which argmax would pick.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(-1)


def _ends_in_tail(tokenizer, strings, tokens):
    """Whether one of the strings occurs in the bytes of the last tokens: a string of n bytes that ends in the last
    token lies within the last n tokens (every token is at least one byte); earlier ends were checked earlier."""
    n = max(len(s.encode()) for s in strings)
    tail = b"".join(tokenizer.token_bytes(tokens[-n:]))
    return any(s.encode() in tail for s in strings)


def _check_stop(tokenizer, tokens, limit, stop, delimiters=(), context=()):
    """Why a row with these new tokens is finished: "eos" (any of the tokenizer's stop ids, e.g. EOS or Qwen's
    <|im_end|>), "stop" (a stop string ends in its last token), "step" (a step delimiter does: a beam-search step
    is complete), "length", or None. Both are matched on bytes, as data.py finds step delimiters for training.
    Stop strings end the response, so they are matched on all of it: context is the response's tokens before these
    new ones (a beam's earlier steps). A step is these new tokens only."""
    if tokenizer is not None and tokens and tokens[-1] in tokenizer.stop_ids:
        return "eos"
    if stop:
        n = max(len(s.encode()) for s in stop)
        seen = tokens[-n:] if len(tokens) >= n or not context else list(context[-(n - len(tokens)):]) + tokens
        if _ends_in_tail(tokenizer, stop, seen):
            return "stop"
    if delimiters and tokens and _ends_in_tail(tokenizer, delimiters, tokens):
        return "step"
    if len(tokens) >= limit:
        return "length"
    return None


def end_state(tokenizer, response, finish, stop=()):
    """How many response tokens the state holds whose action ends the response (DESIGN §1 "Test-time search"): a
    value is trained at state s_j only when x_{j+1} is an action, so the end token's own position never is. Ended
    by a stop id: all tokens but it. By a stop string: the tokens before the first byte of its first occurrence
    (data.py trains on the text cut there, then EOS; a token that straddles the cut is left out). A step or a
    length cut: all of them (that state's action is the next token)."""
    if finish == "eos":
        return len(response) - 1
    if finish != "stop":
        return len(response)
    pieces = tokenizer.token_bytes(response)
    text = b"".join(pieces)
    cut = min(text.find(s.encode()) for s in stop if s.encode() in text)
    n, size = 0, 0
    while size + len(pieces[n]) <= cut:
        size += len(pieces[n])
        n += 1
    return n


def end_state_values(value_fn, tokenizer, prompts, responses, finish, stop=()):
    """The value of each response at its end state (end_state: before the EOS or stop string that ended it), read
    by value_fn(seqs) -> values at the last tokens on prompt + the response's tokens up to that state."""
    return value_fn([p + r[:end_state(tokenizer, r, f, stop)] for p, r, f in zip(prompts, responses, finish)])


def _limits(model, prompts, max_new_tokens):
    """Per-row new-token limits: max_new_tokens (an int or one per row), cut to the model's max_seq_len."""
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    limits = []
    for i, (prompt, n) in enumerate(zip(prompts, max_new_tokens)):
        if not prompt or len(prompt) > model.config.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; it needs 1 to max_seq_len = "
                             f"{model.config.max_seq_len} tokens")
        limits.append(max(0, min(n, model.config.max_seq_len - len(prompt))))
    return limits


def _as_tuple(strings):
    return (strings,) if isinstance(strings, str) else tuple(strings)   # one string is one, not its characters


def _sample_rows(model, tokenizer, cache, logits, sources, limits, sampling, generator, stop, delimiters, contexts):
    """Sample each output row r from cache row sources[r] (its next-token logits in logits) until it finishes;
    returns (new tokens per row, finish: why each row finished). Rows with limit 0 finish at once ("length"); the others are
    forked from their sources. A finished row stays in the batch (decoded in vain) until finished rows are half of
    it or one would outgrow the cache: then they leave together, since every leaving copies the batch's cache.
    Only the unfinished rows are sampled, so the random numbers drawn do not depend on when rows leave."""
    device, size = logits.device, cache.k.shape[3]
    out = [[] for _ in sources]
    finish = ["length" if n == 0 else None for n in limits]
    in_batch = [r for r, f in enumerate(finish) if f is None]   # the output row of each row of the cache
    if [sources[r] for r in in_batch] != list(range(len(logits))):
        rows = torch.tensor([sources[r] for r in in_batch], dtype=torch.long, device=device)
        cache, logits = cache.select(rows), logits[rows]
    written = cache.lengths.tolist()   # tokens in each cache row
    live = list(range(len(in_batch)))  # the cache rows still sampling
    while live:
        rows = None if len(live) == len(in_batch) else torch.tensor(live, dtype=torch.long, device=device)
        next_ids = sample_next(logits if rows is None else logits[rows], generator=generator, **sampling)
        still = []
        for i, token in zip(live, next_ids.tolist()):
            r = in_batch[i]
            out[r].append(token)
            finish[r] = _check_stop(tokenizer, out[r], limits[r], stop, delimiters, contexts[r])
            if finish[r] is None:
                still.append(i)
        if not still:
            break
        tokens = next_ids if rows is None else torch.zeros(len(in_batch), dtype=torch.long, device=device)
        if rows is not None:
            tokens[rows] = next_ids
        if 2 * (len(in_batch) - len(still)) >= len(in_batch) or max(written) >= size:
            rows = torch.tensor(still, dtype=torch.long, device=device)
            cache, tokens = cache.select(rows), tokens[rows]
            in_batch, written = [in_batch[i] for i in still], [written[i] for i in still]
            still = list(range(len(still)))
        live = still
        logits = model.decode(tokens, cache)
        written = [w + 1 for w in written]
    return out, finish


@torch.no_grad()
def generate_with_finish(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                         generator=None, stop=(), n_samples=1, delimiters=(), contexts=None):
    """New tokens per row (the EOS / stop id included when sampled) and why each row stopped ("eos" | "stop" |
    "step" | "length"). There are n_samples rows per prompt, prompt-major (row r continues prompt r // n_samples):
    each prompt is prefilled once and its cache rows copied. delimiters end a row too ("step"); contexts, one per
    prompt, are the tokens at the end of the prompt that already belong to the response, for stop strings to be
    matched across (a beam's earlier steps). tokenizer None: no EOS, no stop strings (benchmarks)."""
    device = model.lm_head.weight.device
    limits = _limits(model, prompts, max_new_tokens)
    contexts = contexts or [()] * len(prompts)
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    input_ids = right_padded(prompts, device)                                        # (B, T)
    cache = model.new_cache(B, max(len(p) + n for p, n in zip(prompts, limits)))
    logits = model.prefill(input_ids, lengths, cache)                                # (B, V)
    rows = [r // n_samples for r in range(B * n_samples)]
    return _sample_rows(model, tokenizer, cache, logits, rows, [limits[b] for b in rows],
                        dict(temperature=temperature, top_p=top_p, top_k=top_k), generator, _as_tuple(stop),
                        _as_tuple(delimiters), [contexts[b] for b in rows])


@torch.no_grad()
def generate_naive(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                   generator=None, stop=(), delimiters=(), contexts=None):
    """The reference for the engine above: no cache, the whole right-padded batch through the model per token.
    Returns the same (tokens, finish) and draws the same random numbers."""
    device = model.lm_head.weight.device
    limits = _limits(model, prompts, max_new_tokens)
    stop, delimiters, contexts = _as_tuple(stop), _as_tuple(delimiters), contexts or [()] * len(prompts)
    out = [[] for _ in prompts]
    finish = ["length" if n == 0 else None for n in limits]
    while any(f is None for f in finish):
        active = [b for b, f in enumerate(finish) if f is None]
        seqs = [prompts[b] + out[b] for b in active]
        input_ids = right_padded(seqs, device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        logits = model(input_ids)[torch.arange(len(seqs), device=device), last]     # (B_active, V)
        for b, token in zip(active, sample_next(logits, temperature, top_p, top_k, generator).tolist()):
            out[b].append(token)
            finish[b] = _check_stop(tokenizer, out[b], limits[b], stop, delimiters, contexts[b])
    return out, finish


def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, generator=None,
             stop=()):
    """New tokens (list[list[int]]) for each prompt (list[list[int]]); EOS is the last token when sampled."""
    return generate_with_finish(model, tokenizer, prompts, max_new_tokens, temperature, top_p, top_k, generator,
                                stop)[0]


def sample_batched(model, tokenizer, prompts, max_new_tokens, batch_size, n_samples=1, **sampling):
    """generate_with_finish over batches of about batch_size rows (longest prompts first, so that a batch holds
    similar lengths); n_samples rows per prompt, prompt-major, in the order of prompts."""
    limits = _limits(model, prompts, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    per_batch = max(1, batch_size // n_samples)
    out, finish = [None] * (len(prompts) * n_samples), [None] * (len(prompts) * n_samples)
    for i in range(0, len(order), per_batch):
        idx = order[i:i + per_batch]
        tokens, batch_finish = generate_with_finish(model, tokenizer, [prompts[j] for j in idx],
                                                    [limits[j] for j in idx], n_samples=n_samples, **sampling)
        for k, j in enumerate(idx):
            out[j * n_samples:(j + 1) * n_samples] = tokens[k * n_samples:(k + 1) * n_samples]
            finish[j * n_samples:(j + 1) * n_samples] = batch_finish[k * n_samples:(k + 1) * n_samples]
    return out, finish


# ----------------------------------------------------------------------------------------------------------
# Values


@torch.no_grad()
def values_at(value_model, seqs, positions, batch_size=64):
    """V(s) at the given positions of each sequence (seqs list[list[int]], positions list[list[int]]) ->
    list[list[float]]; batches of similar lengths, right padded (no position sees the padding after it)."""
    device = value_model.head.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    values = [[] for _ in seqs]
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        v = value_model(right_padded([seqs[j] for j in idx], device))                             # (B, T)
        rows = torch.tensor([b for b, j in enumerate(idx) for _ in positions[j]], device=device)
        cols = torch.tensor([p for j in idx for p in positions[j]], device=device)
        flat = v[rows, cols].tolist()                                                            # one gather
        for j in idx:
            values[j], flat = flat[:len(positions[j])], flat[len(positions[j]):]
    return values


def last_token_values(value_model, seqs, batch_size=64):
    """V(s) at the last token of each sequence (list[list[int]]) -> list[float]. The full-recompute reference of
    the cached values below."""
    return [v for v, in values_at(value_model, seqs, [[len(s) - 1] for s in seqs], batch_size)]


def _extend_rows(model, cache, new_tokens):
    """model.extend with one token list per cache row; the hidden states or values (B, T), T the longest list.
    Padding every row to the longest can waste most of the work (a few long steps among many short ones), so the
    rows are cut at the length that costs least: all rows append their first `cut` tokens in place, and the
    longer ones the rest on a copy of their cache rows, copied back after (counted as ~4 tokens a row)."""
    device = cache.lengths.device
    lengths = [len(t) for t in new_tokens]
    T = max(1, max(lengths))
    padded = lambda c: len(lengths) * c + sum(n - c + 4 for n in lengths if n > c)   # token slots computed
    cut = min(sorted(set(lengths) - {0} | {T}), key=padded)
    tokens = right_padded([t[:cut] for t in new_tokens], device, cut)                              # (B, cut)
    out = model.extend(tokens, torch.tensor([min(n, cut) for n in lengths], device=device), cache)
    if cut == T:
        return out
    longer = torch.tensor([i for i, n in enumerate(lengths) if n > cut], dtype=torch.long, device=device)
    rest = cache.select(longer)
    rest_out = _extend_rows(model, rest, [t[cut:] for t in new_tokens if len(t) > cut])
    cache.k[:, longer], cache.v[:, longer], cache.lengths[longer] = rest.k, rest.v, rest.lengths
    full = out.new_zeros((len(lengths), T, *out.shape[2:]))
    full[:, :cut] = out
    full[longer, cut:] = rest_out
    return full


@torch.no_grad()
def cached_values(value_model, prompts, k, samples, states, batch_size=64):
    """The value of the state prompts[r // k] + samples[r][:states[r]] for each of the k samples per prompt:
    every prompt is read once into the value model's cache, its rows forked k times and each sample appended
    in one forward, so a sample costs only its own tokens. -> list[float]."""
    values = []
    per_batch = max(1, batch_size // k)
    for i in range(0, len(prompts), per_batch):
        group = prompts[i:i + per_batch]
        rows = samples[i * k:(i + len(group)) * k]
        cache = value_model.new_cache(len(group), max(len(p) for p in group) + max(len(s) for s in rows))
        prompt_values = _extend_rows(value_model, cache, group).tolist()          # (G, T) on the empty cache
        cache = cache.select(torch.arange(len(group), device=cache.lengths.device).repeat_interleave(k))
        sample_values = _extend_rows(value_model, cache, rows).tolist()
        for j in range(len(rows)):
            prompt, m = group[j // k], states[i * k + j]
            values.append(sample_values[j][m - 1] if m > 0 else prompt_values[j // k][len(prompt) - 1])
    return values


class CachedBeams:
    """The expand() of search.beam_search that keeps the KV caches of the open beams across expansions.

    Policy: one cache row per open beam, holding its prompt and response, and the beam's next-token logits. A
    beam's children are forked from its row (Cache.select) and sampled up to the next delimiter; the next beams
    get their parent's row with their new tokens appended in one forward (Transformer.extend), and every other row
    is dropped (freed).
    Value model: its own cache, one row per candidate, forked from the parent's row and extended by the
    candidate's new tokens in one forward, which gives V at each new position. A beam keeps V over its whole
    sequence, so the value at any end state (end_state) is a look-up. value may also be a callable
    value(seqs) -> [float] at the last tokens; then it is called on each candidate's end state.
    Sampling draws the same random numbers in the same order as the full-recompute expander of search.py (one
    generate_with_finish over all parents), so with the same generator both give the same candidates."""

    def __init__(self, policy, tokenizer, value, prompts, beam_width, delimiters, stop, max_new_tokens, sampling,
                 generator):
        self.policy, self.tokenizer, self.value, self.prompts = policy, tokenizer, value, prompts
        self.beam_width, self.delimiters, self.stop = beam_width, _as_tuple(delimiters), _as_tuple(stop)
        self.max_new_tokens, self.sampling, self.generator = max_new_tokens, sampling, generator
        self.max_len = min(policy.config.max_seq_len, max(len(p) for p in prompts) + max_new_tokens)
        self.device = policy.lm_head.weight.device
        self.candidates = []   # of the last expansion: (row of its parent's beam, new tokens, V over the sequence)

    @torch.no_grad()
    def __call__(self, parents):
        """parents: (prompt index, response, id of the candidate of the previous call it is, None at the first)."""
        B = self.beam_width
        seqs = [self.prompts[i] + resp for i, resp, _ in parents]
        limits = _limits(self.policy, seqs, [self.max_new_tokens - len(resp) for _, resp, _ in parents])
        self._set_beams(parents)
        rows = [p for p in range(len(parents)) for _ in range(B)]
        children = self.beams.select(torch.tensor(rows, dtype=torch.long, device=self.device))
        tokens, finish = _sample_rows(self.policy, self.tokenizer, children, self.logits[rows], list(range(len(rows))),
                                      [limits[p] for p in rows], self.sampling, self.generator, self.stop,
                                      self.delimiters, [parents[p][1] for p in rows])
        responses = [parents[p][1] + t for p, t in zip(rows, tokens)]
        if isinstance(self.value, ValueModel):
            states = [end_state(self.tokenizer, r, f, self.stop) for r, f in zip(responses, finish)]
            self.value_cache = self.value_cache.select(torch.tensor(rows, dtype=torch.long, device=self.device))
            new_values = _extend_rows(self.value, self.value_cache, tokens).tolist()
            seq_values = [self.seq_values[p] + v[:len(t)] for p, t, v in zip(rows, tokens, new_values)]
            values = [v[len(self.prompts[parents[p][0]]) + m - 1] for p, v, m in zip(rows, seq_values, states)]
        else:
            seq_values = [None] * len(rows)
            values = end_state_values(self.value, self.tokenizer, [self.prompts[parents[p][0]] for p in rows],
                                      responses, finish, self.stop)
        self.candidates = list(zip(rows, tokens, seq_values))
        return [list(zip(tokens[p * B:(p + 1) * B], finish[p * B:(p + 1) * B], values[p * B:(p + 1) * B]))
                for p in range(len(parents))]

    def _set_beams(self, parents):
        """self.beams, self.logits (the policy's) and self.value_cache, self.seq_values for these parents."""
        if parents[0][2] is None:   # the first expansion: the parents are the prompts, each read once
            input_ids = right_padded(self.prompts, self.device)                                 # (P, T)
            lengths = torch.tensor([len(p) for p in self.prompts], device=self.device)
            self.beams = self.policy.new_cache(len(self.prompts), self.max_len)
            self.logits = self.policy.prefill(input_ids, lengths, self.beams)                   # (P, V)
            if isinstance(self.value, ValueModel):
                self.value_cache = self.value.new_cache(len(self.prompts), self.max_len)
                values = self.value.extend(input_ids, lengths, self.value_cache).tolist()       # (P, T)
                self.seq_values = [v[:len(p)] for v, p in zip(values, self.prompts)]
            return
        ids = torch.tensor([c for _, _, c in parents], dtype=torch.long, device=self.device)
        chosen = [self.candidates[c] for _, _, c in parents]
        self.beams = self.beams.select(torch.tensor([row for row, _, _ in chosen], device=self.device))
        hidden = _extend_rows(self.policy, self.beams, [new for _, new, _ in chosen])           # (P, T, D)
        last = torch.tensor([len(new) - 1 for _, new, _ in chosen], device=self.device)
        self.logits = self.policy.lm_head(hidden[torch.arange(len(chosen), device=self.device), last])
        if isinstance(self.value, ValueModel):
            self.value_cache = self.value_cache.select(ids)
            self.seq_values = [v for _, _, v in chosen]
