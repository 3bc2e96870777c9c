"""CaMeLS (Hu et al. 2023): meta-learned token loss weights for online adaptation of LMs.

A weighting model (:class:`TokenWeighting`) gives each token of a document a loss
weight; one weighted SGD step of a base language model on the document should let it
answer questions about the document (:class:`CaMeLS`, one bilevel problem per
document through :mod:`metaopt.bilevel`'s estimators and task batching)::

    from metaopt.models import TinyLM, TinyLMConfig
    from metaopt.algorithms.camels import CaMeLS, TokenWeighting
    camels = CaMeLS(base_lm, TokenWeighting(TinyLM(TinyLMConfig(vocab_size=V))))
    loss = camels.meta_loss(doc_ids, doc_mask, qa_ids, answer_mask, loc_ids, loc_mask)
    loss.backward()                          # dF/dφ in the weighting model's .grad
    theta = camels.adapt(doc_ids, doc_mask)  # the base model after the weighted step

Online adaptation over a stream with any weighting (CaMeLS or the uniform, TF-IDF
and oracle baselines): :func:`stream_adapt`, :func:`stream_answer_nll`,
:func:`greedy_answer`.

SQuAD-style scoring of generated answers: :func:`squad_normalize`,
:func:`exact_match`, :func:`f1`.
"""

from metaopt.algorithms.camels.metrics import exact_match, f1, squad_normalize
from metaopt.algorithms.camels.objective import (
    CaMeLS,
    adapted_lr,
    answer_nll,
    group_documents,
    locality_kl,
    token_nll,
    weighted_lm_loss,
)
from metaopt.algorithms.camels.online import (
    greedy_answer,
    idf_weights,
    inverse_document_frequency,
    oracle_weights,
    stream_adapt,
    stream_answer_nll,
    uniform_weights,
)
from metaopt.algorithms.camels.weighting import (
    SOFTPLUS_BETA,
    TokenWeighting,
    backbone_hidden_states,
)

__all__ = [
    "SOFTPLUS_BETA",
    "CaMeLS",
    "TokenWeighting",
    "adapted_lr",
    "answer_nll",
    "backbone_hidden_states",
    "exact_match",
    "f1",
    "greedy_answer",
    "group_documents",
    "idf_weights",
    "inverse_document_frequency",
    "locality_kl",
    "oracle_weights",
    "squad_normalize",
    "stream_adapt",
    "stream_answer_nll",
    "token_nll",
    "uniform_weights",
    "weighted_lm_loss",
]
