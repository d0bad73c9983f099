"""langchain-tests' standard suites for ``ChatSAC``.

The unit suite builds the model with the default (packaged) compressor name: construction must
be instant and load nothing. The integration suite runs against a tiny random Llama with an
untrained KV-dropping compressor and a store precompressed with it: it checks the LangChain
contract (invoke, stream, batch, async, usage metadata, stop), not answer quality.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage
from langchain_sac import ChatSAC, marker_for, sac_qa_prompt
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from sac_rag.handles import SACEngine
from sac_rag.store import AnchorStore

# The shared test helpers of integrations/conftest.py (outside pytest fixtures: the suites
# read their parameters from properties).
_spec = importlib.util.spec_from_file_location("_sac_integration_helpers",
                                               Path(__file__).resolve().parents[2] / "conftest.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


class TestChatSACUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSAC]:
        return ChatSAC

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2-135m-sac-5x"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one model's K/V caches are meaningless to another model

    @pytest.mark.xfail(reason="load(allowed_objects='all') admits only the classes langchain-core's own mapping "
                       "lists, which no package outside it can join; test_langchain_sac.py loads the same record "
                       "with allowed_objects=[ChatSAC]", raises=ValueError, strict=True)
    def test_serdes(self, model: ChatSAC, snapshot) -> None:
        super().test_serdes(model, snapshot)  # the record matches the snapshot; only loading fails


@functools.cache
def tiny_engine() -> SACEngine:
    folder = Path(tempfile.mkdtemp(prefix="chatsac-standard-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    compressor = _helpers.make_compressor()
    return SACEngine(compressor, _helpers.make_store(folder / "store", compressor))


class TestChatSACIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSAC]:
        return ChatSAC

    @property
    def chat_model_params(self) -> dict:
        return {"engine": tiny_engine(), "max_tokens": 8}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A prompt whose context is two cached chunks: their K/V entries are the cache reads."""
        context = "".join(marker_for(AnchorStore.key_for(p)) for p in _helpers.PASSAGES[:2])
        prompt = sac_qa_prompt().format(context=context, question="What is painted red?")
        llm = ChatSAC(**self.chat_model_params)
        if not stream:
            return llm.invoke(prompt)
        full = None
        for chunk in llm.stream(prompt):
            full = chunk if full is None else full + chunk
        return full
