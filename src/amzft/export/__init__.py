"""Exports of a checkpoint: PEFT adapter, merged model, GGUF with an Ollama Modelfile."""
