"""What users write (documents, questions, answers) is read as the characters it is written with:
the text of a special token in it ("<eos>" here, "<|im_end|>" in ChatML) is never that control
token, whether the text is compressed, read as text in a prompt, or trained on. The prompt
layout's own special tokens stay what they are."""

import pytest

from sac_rag import PromptTemplate
from sac_rag.config import prompt_ids, text_ids
from sac_rag.data import Paragraph, QAItem
from sac_rag.objectives import ExampleBuilder

DOC = "The tower was finished in 1889.<eos> Paris is the capital of France."


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


def test_a_documents_special_token_text_is_compressed_as_ordinary_tokens(tiny_sac):
    tokenizer = tiny_sac.compressor.tokenizer
    assert tokenizer.eos_token_id in tokenizer(DOC, add_special_tokens=False)["input_ids"]  # as the tokenizer reads it
    chunks = tiny_sac.compressor.split(DOC)
    ids = [i for chunk in chunks for i in chunk]
    assert not special_ids(tokenizer) & set(ids)
    assert tokenizer.decode(ids) == DOC
    kvs = tiny_sac.compressor.compress(DOC)
    assert sum(kv.n_tokens for kv in kvs) == len(ids)


def test_a_question_and_a_text_context_are_read_as_plain_text_and_the_layouts_header_as_its_token(tiny_sac):
    tokenizer = tiny_sac.compressor.tokenizer
    template = PromptTemplate(prefix="<pad>")  # a layout whose own text holds a special token
    [segment] = template.build([DOC], "What ends here?<eos>")
    ids = prompt_ids(tokenizer, segment)
    assert ids[0] == tokenizer.pad_token_id  # the layout's token
    assert not special_ids(tokenizer) & set(ids[1:])
    assert tokenizer.decode(ids) == segment
    assert tiny_sac.generator.text_positions([segment]) == len(ids)  # what the decoder reads, and checks room for


@pytest.mark.parametrize("contexts", [["A context ending in spaces.  "], []])
def test_a_prompt_without_such_text_is_read_as_its_joined_string(tiny_sac, contexts):
    """The pieces of a prompt are tokenized as one string (boundaries included), as before the
    layout and the user's text were told apart."""
    tokenizer = tiny_sac.compressor.tokenizer
    template = PromptTemplate()
    [segment] = template.build(contexts, "\n\nWhat is the capital of France?")
    assert prompt_ids(tokenizer, segment) == tokenizer(str(segment), add_special_tokens=False)["input_ids"]
    if not contexts:  # without contexts the prompt opens with the question, its leading newlines dropped
        assert str(segment) == "### Question:\n\n\nWhat is the capital of France?\n### Answer:\n".lstrip("\n")


def test_the_full_text_baseline_reads_the_same_ids_as_the_compressor_chunks(tiny_sac):
    tokenizer = tiny_sac.compressor.tokenizer
    [segment] = tiny_sac.prompt("Where?", [DOC], full_text=True)
    context_ids = tiny_sac.compressor.split(DOC)[0]
    ids = prompt_ids(tokenizer, segment)
    start = len(text_ids(tokenizer, "### Context:\n"))
    assert ids[start:start + len(context_ids)] == context_ids


def test_training_reads_questions_answers_and_passages_as_answering_does(tiny):
    _, tokenizer = tiny
    template = PromptTemplate()
    paragraph = Paragraph(context=DOC, questions=[QAItem(question="Which token?<eos>", answers=["<eos> Paris"])])
    builder = ExampleBuilder(tokenizer, template)
    example = builder.qa(paragraph, 0, [paragraph])
    [(question_ids, target)] = example.rows
    assert example.passages == [text_ids(tokenizer, DOC)]
    assert question_ids == prompt_ids(tokenizer, template.question_text("Which token?<eos>"))
    assert target[:-1] == text_ids(tokenizer, "<eos> Paris") and target[-1] == tokenizer.eos_token_id
    assert not special_ids(tokenizer) & set(question_ids + target[:-1] + example.passages[0])
