"""Text models on the shared blocks: GPT, BERT, T5, the encoder-decoder Transformer, tokenizers and
text conditioning for diffusion."""
from visionformers.text.bert import Bert, BertConfig, BertForMaskedLM, BertForSequenceClassification
from visionformers.text.common import ModelOutput
from visionformers.text.conditioning import TextConditioner
from visionformers.text.generation import next_token
from visionformers.text.gpt import GPT, GPTConfig
from visionformers.text.seq2seq import EncoderClassifier, EncoderConfig, Seq2SeqConfig, Seq2SeqTransformer, TransformerStack
from visionformers.text.t5 import T5, T5Config, T5Encoder
from visionformers.text.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "GPT", "GPTConfig", "Bert", "BertConfig", "BertForMaskedLM", "BertForSequenceClassification",
    "T5", "T5Config", "T5Encoder", "Seq2SeqTransformer", "Seq2SeqConfig", "EncoderClassifier", "EncoderConfig",
    "TransformerStack", "TextConditioner", "ModelOutput", "next_token",
    "Tokenizer", "ByteTokenizer", "BPETokenizer", "load_tokenizer",
]
