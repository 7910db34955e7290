"""The static decode step (engram.model.slots) against the plain loop: same tokens, sequences joining and leaving
slots, tables outside the device, overlays per slot, one compiled graph; CUDA graphs on a GPU."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from engram.model import EngramLM, RowOverlay, row_overlays
from engram.model.generation import graph_blockers, resolve_decode
from engram.model.sampling import RowSampling
from engram.model.slots import SlotDecoder

from lm_helpers import VARIANTS, small_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def make_model(variant="engram-mhc4-moe", **overrides) -> EngramLM:
    torch.manual_seed(0)
    return EngramLM(small_config(**VARIANTS[variant], **overrides)).eval()


def prompts(lengths, seed=1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128_815, (n,), generator=generator) for n in lengths]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = row
        mask[index, width - len(row):] = 1
    return ids, mask


def alone(model, prompt, new, **kwargs) -> list[int]:
    """The plain loop's continuation of one prompt."""
    return model.generate(prompt[None], new, decode="eager", **kwargs)[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_static_step_gives_the_plain_loops_tokens(variant):
    """Greedy decoding over a left-padded batch, and seeded sampling (top-k, top-p) on the model with everything:
    the sync-free step picks the tokens the plain loop picks, on MoE, mHC and Engram models alike."""
    model = make_model(variant)
    ids, mask = left_padded(prompts([7, 3, 5]))
    sampled = [dict(temperature=0.9, top_p=0.8, seed=5), dict(temperature=1.1, top_k=7, seed=6)]
    for kwargs in [dict(temperature=0), *(sampled if variant == "engram-mhc4-moe" else [])]:
        eager = model.generate(ids, 8, attention_mask=mask, decode="eager", **kwargs)
        static = model.generate(ids, 8, attention_mask=mask, decode="static", **kwargs)
        assert torch.equal(static, eager), kwargs


def test_eos_ends_the_static_loop_where_the_plain_loop_ends():
    model = make_model()
    ids = torch.stack(prompts([4], seed=4) * 2)  # both rows reach eos at once: the loop ends early
    free = model.generate(ids, 6, temperature=0, decode="eager")
    eos = int(free[0, 5])
    eager = model.generate(ids, 30, temperature=0, eos_token_id=eos, decode="eager")
    static = model.generate(ids, 30, temperature=0, eos_token_id=eos, decode="static")
    assert torch.equal(static, eager) and static.shape[1] < 34


def test_sequences_join_and_leave_slots_between_steps():
    """A sequence admitted while another is mid-decode, a slot freed and reused by a third: each gets exactly the
    tokens it gets alone (nothing of a slot's previous sequence is read)."""
    model = make_model()
    first, second, third = prompts([6, 9, 4], seed=2)
    decoder = SlotDecoder(model, num_slots=3, max_length=40)
    greedy = RowSampling(0.0)
    got = {name: [] for name in ("first", "second", "third")}
    decoder.admit([1], first[None], None, [greedy])
    for _ in range(4):
        decoder.step()
        got["first"].append(int(decoder.tokens[1]))
    decoder.admit([0], second[None], None, [greedy])
    for _ in range(5):
        decoder.step()
        got["first"].append(int(decoder.tokens[1]))
        got["second"].append(int(decoder.tokens[0]))
    decoder.release([1])
    decoder.admit([1], third[None], None, [greedy])
    for _ in range(6):
        decoder.step()
        got["second"].append(int(decoder.tokens[0]))
        got["third"].append(int(decoder.tokens[1]))
    assert got["first"] == alone(model, first, 9, temperature=0)
    assert got["second"] == alone(model, second, 11, temperature=0)
    assert got["third"] == alone(model, third, 6, temperature=0)
    with pytest.raises(ValueError, match=r"slots \[0\] must be distinct free slots"):
        decoder.admit([0], first[None], None, [greedy])


def test_a_slot_left_with_nan_serves_the_next_sequence_exactly():
    """A sequence whose memory rows are NaN fills its slot with NaN keys; the next sequence in that slot must not
    see them (masked scores of NaN keys would be NaN)."""
    model = make_model()
    poisoned, clean = prompts([5, 7], seed=3)
    hash_ids = model.hasher.hash_all(poisoned[None])
    layers = {}
    for block in model.blocks:
        if block.engram is not None:
            table = block.engram.multi_head_embedding
            rows = table.flat_row_ids(hash_ids[block.layer_idx]).flatten().unique()
            layers[block.layer_idx] = (rows, torch.full((rows.shape[0], table.head_dim), float("nan")))
    decoder = SlotDecoder(model, num_slots=1, max_length=32)
    decoder.admit([0], poisoned[None], None, [RowSampling(0.0)], overlays=[RowOverlay(layers)])
    decoder.step()
    assert bool(decoder.broken[0])
    decoder.release([0])
    decoder.admit([0], clean[None], None, [RowSampling(0.0)])
    tokens = []
    for _ in range(5):
        decoder.step()
        tokens.append(int(decoder.tokens[0]))
    assert tokens == alone(model, clean, 5, temperature=0)


def test_each_slot_reads_its_own_overlay():
    model = make_model()
    rows = prompts([6, 6, 5], seed=7)
    overlays = [overlay_for(model, rows[0], seed=1), None, overlay_for(model, rows[2], seed=2)]
    decoder = SlotDecoder(model, num_slots=3, max_length=32)
    ids, mask = left_padded(rows)
    decoder.admit([0, 1, 2], ids, mask, [RowSampling(0.0)] * 3, overlays=overlays)
    tokens = [[] for _ in rows]
    for _ in range(5):
        decoder.step()
        for index in range(3):
            tokens[index].append(int(decoder.tokens[index]))
    for prompt, overlay, got in zip(rows, overlays, tokens):
        with row_overlays(model, [overlay]):
            assert got == alone(model, prompt, 5, temperature=0)
    assert tokens[0] != alone(model, rows[0], 5, temperature=0)  # the overlay is read


def overlay_for(model, prompt, seed) -> RowOverlay:
    """An overlay replacing every row ``prompt`` reads with large random values."""
    hash_ids = model.hasher.hash_all(prompt[None])
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for block in model.blocks:
        if block.engram is not None:
            table = block.engram.multi_head_embedding
            flat = table.flat_row_ids(hash_ids[block.layer_idx]).flatten().unique()
            layers[block.layer_idx] = (flat, 3 * torch.randn(flat.shape[0], table.head_dim, generator=generator))
    return RowOverlay(layers)


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_tables_outside_the_device_split_the_step_and_give_the_same_tokens(tmp_path, placement):
    model = make_model()
    model.save_pretrained(tmp_path)
    placed = EngramLM.from_pretrained(tmp_path, engram_placement=placement).eval()
    ids, mask = left_padded(prompts([5, 8], seed=9))
    decoder = placed.slot_decoder(2, 32)
    assert decoder.store_layers == [0, 2]
    assert [part.waits_for for part in decoder.parts(2, "greedy")] == [None, 0, 2]
    expected = model.generate(ids, 6, temperature=0, attention_mask=mask, decode="eager")
    assert torch.equal(placed.generate(ids, 6, temperature=0, attention_mask=mask, decode="static"), expected)


def test_hash_step_equals_hashing_the_whole_sequence():
    model = make_model()
    hasher = model.hasher
    ids = prompts([9], seed=11)[0][None]
    whole = hasher.hash_all(ids)
    history = hasher.next_history(ids[:, :4])
    for t in range(4, 9):
        step = hasher.hash_step(ids[:, t], history)
        for layer, rows in step.items():
            assert torch.equal(rows, whole[layer][:, t])
    assert torch.equal(history, hasher.next_history(ids))


def test_the_step_compiles_into_one_graph_without_breaks():
    """fullgraph=True raises at any graph break (a host read, a data-dependent branch); the step must also not
    recompile as sequences join, sample differently or advance."""
    model = make_model(hc_sinkhorn_iters=3).to(torch.bfloat16)  # bf16: the grouped-GEMM MoE (no host read)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = SlotDecoder(model, num_slots=4, max_length=32, compile_backend=counter)
    plain = SlotDecoder(model, num_slots=4, max_length=32)
    first, second = prompts([7, 5], seed=12)
    sampling = [RowSampling(0.9, top_p=0.9, seed=1), RowSampling(1.0, top_k=5, seed=2)]
    for decoder in (compiled, plain):
        decoder.admit([0, 2], torch.stack([first, first]), None, sampling)
    for step in range(4):
        if step == 2:
            for decoder in (compiled, plain):
                decoder.admit([1], second[None], None, [RowSampling(0.7, top_p=0.5, seed=3)])
        compiled.step(4)
        plain.step(4)
        assert torch.equal(compiled.tokens, plain.tokens), step
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"


def test_decode_modes_are_chosen_and_checked():
    model = make_model()
    assert resolve_decode(model, "auto") == "eager"  # on the CPU
    assert "not a CUDA device" in graph_blockers(model)[0]
    with pytest.raises(ValueError, match="decode='graph' is not possible: the model is on cpu"):
        model.generate(prompts([3])[0][None], 2, decode="graph")
    with pytest.raises(ValueError, match="decode must be one of"):
        model.generate(prompts([3])[0][None], 2, decode="fast")
    with row_overlays(model, [None]):
        assert any("row_overlays" in reason for reason in graph_blockers(model))


def test_the_model_keeps_one_decoder_while_it_fits():
    model = make_model()
    decoder = model.slot_decoder(2, 40)
    assert decoder.max_length == 64 and model.slot_decoder(2, 64) is decoder  # 40 rounded up, within the context
    assert model.slot_decoder(3, 40) is not decoder
    kept = model.slot_decoder(3, 40)
    model.to(torch.float64)
    assert model.slot_decoder(3, 40) is not kept


@needs_cuda
@pytest.mark.parametrize("variant", ["engram-mhc4-moe", "baseline-plain-dense"])
def test_cuda_graph_decode_gives_the_step_by_steps_tokens(variant):
    """Graphs of every batch size a changing batch runs at (rows join and leave), greedy and sampled."""
    model = make_model(variant, d_model=64, moe=dict(expert_dim=32)).to("cuda", torch.bfloat16)
    graphs = SlotDecoder(model, num_slots=8, max_length=48, cuda_graphs=True)
    steps = SlotDecoder(model, num_slots=8, max_length=48)
    rows = [prompt.cuda() for prompt in prompts([5, 9, 3, 7, 6], seed=13)]
    sampling = [RowSampling(0.0), RowSampling(0.8, seed=4), RowSampling(0.9, top_p=0.7, seed=5), RowSampling(0.0),
                RowSampling(1.0, top_k=4, seed=6)]
    for step in range(12):
        if step < len(rows):  # one more sequence per step: 1, 2, 3, 4 (rounded up), 5 -> 8 rows
            for decoder in (graphs, steps):
                decoder.admit([step], rows[step][None], None, [sampling[step]])
        if step == 8:
            for decoder in (graphs, steps):
                decoder.release([1])
        graphs.step()
        steps.step(graphs.rows_for_step())
        occupied = graphs.occupied
        assert torch.equal(graphs.tokens[occupied], steps.tokens[occupied]), step


@needs_cuda
def test_cuda_graph_generate_matches_the_plain_loop_with_a_host_table(tmp_path):
    model = make_model(d_model=64, moe=dict(expert_dim=32))
    model.save_pretrained(tmp_path)
    device_model = model.to("cuda", torch.bfloat16)
    host_model = EngramLM.from_pretrained(tmp_path, engram_placement="host").to("cuda", torch.bfloat16).eval()
    ids, mask = left_padded(prompts([5, 8, 3], seed=14))
    ids, mask = ids.cuda(), mask.cuda()
    assert resolve_decode(device_model, "auto") == "graph"
    expected = device_model.generate(ids, 12, temperature=0, attention_mask=mask, decode="static")
    for candidate in (device_model, host_model):
        for _ in range(2):  # the second call replays the graphs captured by the first
            assert torch.equal(candidate.generate(ids, 12, temperature=0, attention_mask=mask, decode="graph"),
                               expected)


@pytest.mark.parametrize("device, dtype, tolerance", [
    ("cpu", torch.float32, 1e-5),  # measured ~3e-7
    ("cpu", torch.bfloat16, 0.03),  # measured ~6e-3: bf16 keeps 8 bits
    pytest.param("cuda", torch.bfloat16, 0.03, marks=needs_cuda),  # the same bound for the replayed CUDA graphs
])
def test_each_steps_scores_equal_a_full_forward_within_rounding(device, dtype, tolerance):
    """The scores a slot holds after its prefill and after every step are the next-token logits of one forward over
    the whole sequence so far (no cache), up to the dtype's rounding (relative to the largest score)."""
    model = make_model().to(device, dtype)
    decoder = SlotDecoder(model, num_slots=2, max_length=32, cuda_graphs=device == "cuda")
    sequence = prompts([6], seed=21)[0].to(device)
    decoder.admit([1], sequence[None], None, [RowSampling(0.0)])
    for step in range(8):
        with torch.inference_mode():
            expected = model(sequence[None]).logits[0, -1].float()
        error = (decoder.logits[1] - expected).abs().max() / expected.abs().max()
        assert error <= tolerance, (step, error.item())
        decoder.step()
        sequence = torch.cat([sequence, decoder.tokens[1:2]])
