"""CLIP towers as pure functions, weight import/export, zero-shot heads, FTLO masks."""
from saft_jax.models.configs import (ACTIVATIONS, CLIP_PRESETS, TEXT_B, TEXT_L, TEXT_TINY,
                                     VIT_B_16, VIT_B_32, VIT_L_14, VIT_TINY, CLIPConfig,
                                     TextConfig, VisionConfig, clip_config, vision_config,
                                     with_act)
from saft_jax.models.clip import (clip_logits, encode_image, encode_text, init_clip_params,
                                  init_text_params, init_vision_params, layer_norm, normalize)
from saft_jax.models.attention import attention
from saft_jax.models.ftlo import ftlo_mask, ftlo_predicate
from saft_jax.models.load import (CLIP, UnknownActivationError, detect_format, load_clip,
                                  save_clip)
from saft_jax.models.tokenizer import (BPE_VOCAB_FILE, BPETokenizer, load_tokenizer,
                                       open_clip_bpe_path, tokenize)
from saft_jax.models.templates import (CLASSNAMES, DATASETS, TEMPLATES, format_prompts,
                                       get_classnames, get_templates)
from saft_jax.models.zeroshot import (classify, head_from_text_embeddings, params_hash, prompts,
                                      zeroshot_head)
from saft_jax.models.t5 import (T5Config, greedy_decode, init_t5_params, rank_classify,
                                relative_position_bucket, sequence_logprob, shift_right,
                                t5_logits)
from saft_jax.models.t5 import decode as t5_decode, encode as t5_encode
from saft_jax.models.t5_load import T5, load_t5, save_t5
from saft_jax.models.text_vocab import (ByteVocab, WordVocab, decode_texts, encode_texts,
                                       load_text_tokenizer)
