"""Weight quantization: packed integer storage (QuantLinear), RTN min-max, GPTQ and activation-aware scaling."""
