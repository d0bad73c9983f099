"""sac_rag with a causal LM that is not the packaged SmolLM2, end to end, as its user would run it.

A tiny random Mistral is saved with ``save_pretrained`` (model + tokenizer) and its directory is
the model id everywhere: ``load_base_model``, a compressor configured by it, ``python -m
sac_rag.train``, ``SAC.from_pretrained`` of the checkpoint, ``python -m sac_rag.precompress``,
answers from the store through the API, LangChain and LlamaIndex, and the refusals between its
store and SmolLM2's. It differs from SmolLM2 wherever code could have assumed SmolLM2: another
family; head_dim 32 on hidden size 64 (q/k/v wider than the hidden state); untied output
embeddings; more embedding rows than tokens; weights saved in bfloat16; a tokenizer that adds a
BOS token, has no pad token and has its own (non-ChatML) chat template.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _CORPUS, make_tiny_llama, requires_smollm2

from sac_rag import (
    SAC,
    FingerprintMismatchError,
    GenerationConfig,
    ModelNotAvailableError,
    SACCompressor,
    SACConfig,
    load_base_model,
)
from sac_rag.compressor import checkpoint_meta
from sac_rag.fingerprint import base_model_fingerprint, base_part
from sac_rag.precompress import load_compressed, precompress
from sac_rag.precompress import main as precompress_main
from sac_rag.store import AnchorStore

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
DOCUMENTS = {
    "lighthouse.txt": "The lighthouse on Gull Point was built in 1874 and painted red in 1902.",
    "mill.md": "Marta keeps bees behind the old mill; her honey won a prize at the county fair.",
}
FACTS = [
    ("The tower was finished in 1889 by the company of the engineer.", "When was the tower finished?", "1889"),
    ("Paris is the capital of France and its largest city.", "What is the capital of France?", "Paris"),
    ("The quick brown fox jumps over the lazy dog every morning.", "What does the fox jump over?", "the lazy dog"),
    ("Anchors carry the meaning of a chunk to the decoder.", "What carries the meaning?", "Anchors"),
]
QUESTION = "When was the lighthouse painted red?"
TINY = ["--ratio", "2", "--chunk-len", "64", "--lora-rank", "4", "--lora-alpha", "8"]


def _tokenizer(chat_template: str = CHAT_TEMPLATE):
    """Byte-level BPE (as conftest's) that adds a BOS token, has no pad token and its own chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def _save_tiny_mistral(directory: Path) -> str:
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = _tokenizer()
    config = MistralConfig(
        vocab_size=(len(tokenizer) // 64 + 2) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"python -m {module} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The saved model (``ws / "tiny-mistral"``), a SQuAD-format file and a folder corpus."""
    ws = tmp_path_factory.mktemp("other-model")
    _save_tiny_mistral(ws / "tiny-mistral")
    articles = [{"title": f"article-{i}", "paragraphs": [{"context": context, "qas": [
        {"id": f"q{i}", "question": question, "answers": [{"text": answer, "answer_start": context.index(answer)}]}]}]}
        for i, (context, question, answer) in enumerate(FACTS * 2)]
    (ws / "squad.json").write_text(json.dumps({"version": "1.1", "data": articles}))
    (ws / "corpus").mkdir()
    for name, text in DOCUMENTS.items():
        (ws / "corpus" / name).write_text(text + "\n")
    return ws


@pytest.fixture(scope="module")
def model_dir(workspace) -> str:
    return str(workspace / "tiny-mistral")


@pytest.fixture(scope="module")
def checkpoint(workspace, model_dir) -> Path:
    """``python -m sac_rag.train`` finetunes a compressor on the model for a few steps."""
    _run("sac_rag.train", "--base-model", model_dir, "--data", str(workspace / "squad.json"),
         "--out-dir", str(workspace / "run"), *TINY, "--batch-size", "2", "--micro-batch-size", "2",
         "--max-steps", "3", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0", "--eval-questions", "2",
         "--checkpoint-every", "3", "--precision", "fp32", "--held-out-fraction", "0.25")
    return workspace / "run" / "final"


@pytest.fixture(scope="module")
def store(workspace, checkpoint) -> tuple[str, dict]:
    """``python -m sac_rag.precompress`` of the corpus with the trained compressor: (store, summary)."""
    path = workspace / "corpus.store"
    done = _run("sac_rag.precompress", "--corpus", str(workspace / "corpus"), "--store", str(path),
                "--compressor", str(checkpoint), "--chunk-tokens", "16", "--dtype", "float32", "--no-progress",
                "--json")
    return str(path), json.loads(done.stdout)


@pytest.fixture(scope="module")
def sac(checkpoint) -> SAC:
    return SAC.from_pretrained(checkpoint, dtype="float32", generation=GenerationConfig(max_new_tokens=4))


@pytest.fixture(scope="module")
def stored_texts(store, sac) -> list[str]:
    with AnchorStore.open(store[0], sac.fingerprint, readonly=True) as opened:
        return [opened.metadata(key)["text"] for key in opened.keys()]


def test_load_base_model_takes_the_saved_directory_as_a_string_or_a_path(model_dir):
    model, tokenizer = load_base_model(model_dir, dtype="float32")
    assert type(model).__name__ == "MistralForCausalLM" and model.dtype == torch.float32
    assert model.sac_model_id == model_dir and not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # it had none
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    again, tokenizer_again = load_base_model(Path(model_dir), dtype="bfloat16")
    assert again.sac_model_id == model_dir
    assert base_model_fingerprint(again, tokenizer_again) == base_model_fingerprint(model, tokenizer)


def test_a_compressor_configured_by_the_directory_compresses_answers_and_round_trips(model_dir, tmp_path):
    config = SACConfig(base_model=Path(model_dir), ratio=2, chunk_len=64, lora_rank=4, lora_alpha=8)
    assert config.base_model == model_dir
    compressor = SACCompressor(config, dtype="float32")
    assert compressor.fingerprint.startswith(f"{model_dir}@")
    text = DOCUMENTS["lighthouse.txt"]
    chunks = compressor.compress(text)
    ids = compressor.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_tokens, anchors = len(ids), len(compressor.anchor_indices(ids))
    assert [tuple(c.keys.shape) for c in chunks] == [(3, 2, anchors, 32)]  # layers, KV heads, anchors, head_dim

    sac = SAC(compressor, GenerationConfig(max_new_tokens=4, stop=("\n###",)))
    answer = sac.answer(QUESTION, [text])
    assert answer.cached_tokens == chunks[0].n_anchors and answer.context_tokens == n_tokens
    assert sac.answer(QUESTION, chunks).token_ids == answer.token_ids
    assert sac.answer(QUESTION, [text], full_text=True).cached_tokens == 0
    assert sac.answer(QUESTION, [text], extractive=True).text.strip() in text
    assert len(sac.answer(QUESTION, [text], config=GenerationConfig(max_new_tokens=3, num_beams=2)).token_ids) <= 3
    assert "".join(sac.stream(QUESTION, [text])) == answer.text
    assert [g.token_ids for g in sac.answer_batch([QUESTION, QUESTION], [[text], [text]])] == [answer.token_ids] * 2
    assert SAC(compressor, sac.generation, merge_decoder=True).answer(QUESTION, [text]).token_ids == answer.token_ids

    compressor.save_pretrained(tmp_path / "compressor")
    assert json.loads((tmp_path / "compressor" / "config.json").read_text())["config"]["base_model"] == model_dir
    loaded = SAC.from_pretrained(tmp_path / "compressor", dtype="float32")
    assert loaded.fingerprint == compressor.fingerprint
    assert loaded.answer(QUESTION, [text], config=sac.generation).token_ids == answer.token_ids


def test_the_train_cli_finetunes_a_compressor_that_loads_by_its_directory(workspace, model_dir, checkpoint, sac):
    losses = [json.loads(line) for line in (workspace / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses if "loss" in row] == [1, 2, 3]
    assert json.loads((workspace / "run" / "train_config.json").read_text())["base_model"] == model_dir
    meta = checkpoint_meta(checkpoint)
    assert meta["config"]["base_model"] == model_dir and meta["base_fingerprint"].startswith(f"{model_dir}@")
    # trained and loaded in float32: exactly the compressor the checkpoint records
    assert SACCompressor.from_pretrained(checkpoint, dtype="float32").fingerprint == meta["fingerprint"]
    assert sac.fingerprint == meta["fingerprint"]
    assert sac.answer(QUESTION, [DOCUMENTS["lighthouse.txt"]]).cached_tokens > 0


def test_the_precompress_cli_fills_a_store_the_api_answers_from(store, sac, stored_texts):
    path, summary = store
    assert summary["compressed"] == summary["entries"] == len(stored_texts) > len(DOCUMENTS)
    assert all(any(t in doc + "\n" for doc in DOCUMENTS.values()) for t in stored_texts)  # pieces of the files
    with AnchorStore.open(path, readonly=True) as opened:
        assert opened.fingerprint == sac.fingerprint and opened.dtype == torch.float32
        assert opened.manifest["extra"]["base_model"] == sac.compressor.config.base_model
    chosen = stored_texts[:3]
    kvs = load_compressed(path, chosen, sac.fingerprint)
    answer = sac.answer(QUESTION, kvs)
    assert answer.cached_tokens == sum(kv.n_anchors for kv in kvs) and answer.context_tokens == sum(
        kv.n_tokens for kv in kvs)
    # the stored caches are the ones the compressor makes of the same texts now, wherever they sit
    stored = sac.generator.prompt_logits(sac.prompt(QUESTION, kvs))
    fresh = sac.generator.prompt_logits(sac.prompt(QUESTION, chosen))
    torch.testing.assert_close(stored, fresh, atol=1e-4, rtol=0)


def test_langchain_answers_from_the_store_with_the_models_own_chat_template(store, checkpoint, stored_texts):
    pytest.importorskip("langchain_sac")
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.documents import Document
    from langchain_core.messages import HumanMessage
    from langchain_sac import SACLLM, ChatSAC, SACContextCompressor, create_sac_stuff_chain

    class Usage(BaseCallbackHandler):
        def __init__(self):
            self.cache_read = []

        def on_llm_end(self, response, **kwargs):
            for generation in response.generations[0]:
                message = getattr(generation, "message", None)
                usage = message.usage_metadata if message is not None else generation.generation_info
                self.cache_read.append(usage["input_token_details"]["cache_read"] if message is not None
                                       else usage["cached_tokens"])

    settings = {"compressor": str(checkpoint), "store": store[0], "dtype": "float32"}
    documents = [Document(page_content=t, metadata={"n": i}) for i, t in enumerate(stored_texts[:3])]
    handled = SACContextCompressor(**settings, on_miss="error").compress_documents(documents, QUESTION)
    assert [d.page_content for d in handled] == stored_texts[:3]
    assert all(d.metadata["sac_marker"] == f"<sac:{AnchorStore.key_for(d.page_content)}>" for d in handled)
    with AnchorStore.open(store[0], readonly=True) as opened:
        anchors = sum(opened.get(d.metadata["sac_key"]).n_anchors for d in handled)
    for llm in (ChatSAC(**settings, max_tokens=4), SACLLM(**settings, max_tokens=4)):
        usage = Usage()
        answer = create_sac_stuff_chain(llm).invoke({"context": handled, "question": QUESTION},
                                                    config={"callbacks": [usage]})
        assert isinstance(answer, str) and usage.cache_read == [anchors]
    chat = ChatSAC(**settings, chat_template=True, max_tokens=3)
    assert chat.render([HumanMessage(content="Hi")]) == "<|user|>Hi</s><|assistant|>"
    assert isinstance(chat.invoke("Hi").content, str)


def test_llama_index_query_engine_answers_from_the_store(store, checkpoint, stored_texts, monkeypatch):
    pytest.importorskip("llama_index.llms.sac")
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.llms.sac import SACLLM
    from llama_index.postprocessor.sac import SACNodePostprocessor

    from sac_rag.handles import SACEngine

    nodes = [TextNode(id_=f"node-{i}", text=t) for i, t in enumerate(stored_texts)]

    class FirstNodes(BaseRetriever):
        def _retrieve(self, query_bundle):
            return [NodeWithScore(node=n, score=1.0) for n in nodes[:2]]

    settings = {"compressor": str(checkpoint), "store": store[0], "dtype": "float32"}
    engine = SACEngine.shared(str(checkpoint), store[0], dtype="float32")  # the one both components share
    generations, generate = [], engine.generate

    def recorded(*args, **kwargs):
        result = generate(*args, **kwargs)
        generations.extend(result)
        return result

    monkeypatch.setattr(engine, "generate", recorded)
    llm = SACLLM(**settings, max_tokens=4, stop=[])
    response = RetrieverQueryEngine.from_args(
        FirstNodes(), llm=llm, response_mode="compact", text_qa_template=llm.qa_prompt,
        node_postprocessors=[SACNodePostprocessor(**settings, on_miss="error")]).query(QUESTION)
    assert [n.node.text for n in response.source_nodes] == stored_texts[:2]
    with AnchorStore.open(store[0], readonly=True) as opened:
        anchors = sum(opened.get(AnchorStore.key_for(t)).n_anchors for t in stored_texts[:2])
    assert [g.cached_tokens for g in generations] == [anchors]
    assert isinstance(response.response, str)


@requires_smollm2
def test_stores_of_this_model_and_of_smollm2_refuse_each_others_compressor_naming_both(
        workspace, store, sac, stored_texts, checkpoint, capsys):
    smollm2 = SAC.from_pretrained()  # the packaged default compressor
    ours, theirs = sac.fingerprint, smollm2.fingerprint
    both = re.compile(f"(?s)(?=.*{re.escape(ours)})(?=.*{re.escape(theirs)})")
    with pytest.raises(FingerprintMismatchError, match=both):
        AnchorStore.open(store[0], theirs, readonly=True)
    with pytest.raises(FingerprintMismatchError, match=both):
        load_compressed(store[0], stored_texts[:1], theirs)
    kvs = load_compressed(store[0], stored_texts[:1], ours)
    with pytest.raises(FingerprintMismatchError, match=f"{re.escape(ours)}.*{re.escape(base_part(theirs))}"):
        smollm2.answer(QUESTION, kvs)

    # and the other way: a store of the SmolLM2 compressor, opened with this model's
    text = DOCUMENTS["lighthouse.txt"]
    path = workspace / "smollm2.store"
    with AnchorStore.create(path, theirs, smollm2.compressor.config.ratio, "float32") as created:
        created.put(AnchorStore.key_for(text), smollm2.compress(text)[0], {"text": text})
    with pytest.raises(FingerprintMismatchError, match=both):
        AnchorStore.open(path, ours, readonly=True)
    assert precompress_main(["--corpus", str(workspace / "corpus"), "--store", str(path), "--compressor",
                             str(checkpoint), "--dtype", "float32", "--no-progress"]) == 2
    assert both.search(capsys.readouterr().err)
    pytest.importorskip("langchain_sac")
    from langchain_core.documents import Document
    from langchain_sac import ChatSAC, SACContextCompressor

    with pytest.raises(FingerprintMismatchError, match=both):
        SACContextCompressor(compressor=str(checkpoint), store=str(path), dtype="float32").compress_documents(
            [Document(page_content=text)], QUESTION)
    with pytest.raises(FingerprintMismatchError, match=both):
        ChatSAC(compressor=smollm2.compressor, store=store[0], max_tokens=2).invoke(QUESTION)


def test_a_moved_model_directory_is_named_and_can_be_pointed_to(model_dir, workspace, tmp_path, capsys):
    before, after = tmp_path / "models" / "before", tmp_path / "models" / "after"
    shutil.copytree(model_dir, before)
    compressor = SACCompressor(SACConfig(base_model=str(before), ratio=2, chunk_len=64, lora_rank=4, lora_alpha=8),
                               dtype="float32")
    compressor.save_pretrained(tmp_path / "compressor")
    precompress(workspace / "corpus", tmp_path / "store", compressor, chunk_tokens=16, show_progress=False)
    before.rename(after)

    with pytest.raises(ModelNotAvailableError, match=f"no model directory at '{re.escape(str(before))}'"
                                                     r"(?s:.*)base_model=DIR"):
        SAC.from_pretrained(tmp_path / "compressor", dtype="float32")
    sac = SAC.from_pretrained(tmp_path / "compressor", dtype="float32", base_model=after)
    assert sac.compressor.config.base_model == str(after)
    assert base_part(sac.fingerprint) != base_part(compressor.fingerprint)  # another name for the same weights
    with AnchorStore.open(tmp_path / "store", sac.fingerprint, readonly=True) as opened:
        kvs = opened.get_many(opened.keys()[:2])
    assert sac.answer(QUESTION, kvs, config=GenerationConfig(max_new_tokens=2)).cached_tokens > 0

    argv = ["--corpus", str(workspace / "corpus"), "--store", str(tmp_path / "store"), "--compressor",
            str(tmp_path / "compressor"), "--chunk-tokens", "16", "--dtype", "float32", "--no-progress", "--json"]
    assert precompress_main(argv) == 2
    assert "--base-model DIR" in capsys.readouterr().err
    assert precompress_main([*argv, "--base-model", str(after)]) == 0  # a rerun: everything is stored already
    summary = json.loads(capsys.readouterr().out)
    assert summary["compressed"] == 0 and summary["already_stored"] == summary["chunks"] > 0

    other, tokenizer = make_tiny_llama()  # other weights under the name: refused, naming both
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(FingerprintMismatchError, match=re.escape(base_part(compressor.fingerprint))):
        SAC.from_pretrained(tmp_path / "compressor", dtype="float32", base_model=tmp_path / "other")


def test_directories_that_hold_no_usable_model_are_refused_naming_what_is_missing(model_dir, tmp_path):
    with pytest.raises(ModelNotAvailableError, match="is not a Hugging Face model directory .*no config.json"):
        load_base_model(tmp_path)
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(model_dir) / name, weights_only / name)
    with pytest.raises(ModelNotAvailableError, match=r"(?s)tokenizer of base model .*tokenizer.save_pretrained\(DIR\)"):
        load_base_model(weights_only)
    with pytest.raises(ModelNotAvailableError, match="no model directory at 'no/such/model/dir'"):
        load_base_model("no/such/model/dir")


# -- defects this check found ----------------------------------------------------------------------------


def test_a_chat_template_that_writes_the_bos_token_is_read_with_one_bos(model_dir):
    ChatSAC = pytest.importorskip("langchain_sac").ChatSAC  # noqa: N806
    from langchain_core.messages import HumanMessage

    from sac_rag.handles import SACEngine

    model, tokenizer = load_base_model(model_dir, dtype="float32")
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    config = SACConfig(base_model=model_dir, ratio=2, chunk_len=64, lora_rank=0, bidirectional=False,
                       anchor_embedding="none")
    compressor = SACCompressor(config, model=model, tokenizer=tokenizer)
    read = []
    model.register_forward_pre_hook(lambda module, args, kwargs: read.append(kwargs["input_ids"][0].tolist()),
                                    with_kwargs=True)
    chat = ChatSAC(engine=SACEngine(compressor), chat_template=True, max_tokens=1)
    chat.invoke("Hi")
    bos = tokenizer.bos_token_id
    assert read[0][0] == bos and read[0][1] != bos  # the template's BOS, read once
    assert chat.get_num_tokens_from_messages([HumanMessage(content="Hi")]) == len(read[0])  # and counted once
    assert chat.get_num_tokens("Hi") == len(tokenizer("Hi")["input_ids"])  # BOS, then "Hi"


def test_training_reads_the_prompt_as_answering_does(model_dir):
    from sac_rag.generation import Generator
    from sac_rag.objectives import FullTextObjective, SACObjective

    compressor = SACCompressor(SACConfig(base_model=model_dir, ratio=2, chunk_len=64, lora_rank=4, lora_alpha=8),
                               dtype="float32")
    template = compressor.config.prompt
    objective = SACObjective(compressor, prefix_text=template.prefix + template.context_prefix)
    generator = Generator.from_compressor(compressor)
    assert objective.prefix[:1] == generator._bos == [compressor.tokenizer.bos_token_id]
    full_ft = FullTextObjective(compressor.base_model, compressor.tokenizer, template.prefix + template.context_prefix)
    assert full_ft.prefix == objective.prefix  # Full-FT reads its prompts as the compressor's decoder does


def test_a_compressor_built_on_a_loaded_model_names_that_model(model_dir):
    model, tokenizer = load_base_model(model_dir, dtype="float32")
    compressor = SACCompressor(SACConfig(ratio=2, chunk_len=64, lora_rank=4, lora_alpha=8), model=model,
                               tokenizer=tokenizer)
    assert compressor.config.base_model == model_dir  # what save_pretrained writes and from_pretrained loads
