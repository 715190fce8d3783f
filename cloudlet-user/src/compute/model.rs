//! The model's configuration and weights, read from `config.json` and `model.safetensors`.

use std::path::Path;

use super::ComputeError;

/// What `config.json` says of the network (BERT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct BertConfig {
    #[serde(rename = "hidden_size")]
    pub hidden: usize,
    #[serde(rename = "num_hidden_layers")]
    pub layers: usize,
    #[serde(rename = "num_attention_heads")]
    pub heads: usize,
    #[serde(rename = "intermediate_size")]
    pub intermediate: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
}

/// One linear layer: `weight` is `[out, in]` row-major, as PyTorch stores it.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub input: usize,
    pub output: usize,
}

impl Linear {
    /// `parts` stacked along the output and transposed to `[in, out]` row-major (rows
    /// contiguous along the output, as the backends' products read them), with their
    /// biases: `(weight, bias, in, out)`.
    pub fn stacked_transposed(parts: &[&Linear]) -> (Vec<f32>, Vec<f32>, usize, usize) {
        let input = parts[0].input;
        let output: usize = parts.iter().map(|p| p.output).sum();
        let mut weight = vec![0f32; input * output];
        let mut col = 0;
        for p in parts {
            for o in 0..p.output {
                for i in 0..input {
                    weight[i * output + col + o] = p.weight[o * input + i];
                }
            }
            col += p.output;
        }
        let bias = parts.iter().flat_map(|p| p.bias.iter().copied()).collect();
        (weight, bias, input, output)
    }
}

/// Layer normalisation's scale and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// One encoder layer.
#[derive(Clone, Debug)]
pub struct Layer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_out: Linear,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
}

/// All the weights the embedding needs (the pooler is not used).
#[derive(Clone, Debug)]
pub struct BertWeights {
    pub config: BertConfig,
    /// `[vocab, hidden]`.
    pub word_embeddings: Vec<f32>,
    /// `[positions, hidden]`.
    pub position_embeddings: Vec<f32>,
    /// `[types, hidden]`.
    pub token_type_embeddings: Vec<f32>,
    pub embeddings_norm: LayerNorm,
    pub layers: Vec<Layer>,
}

/// `layer_norm_eps` of the model.
pub const LAYER_NORM_EPS: f32 = 1e-12;

impl BertWeights {
    /// Reads the model folder `dir`.
    pub fn load(dir: &Path) -> Result<Self, ComputeError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ComputeError::Read {
            path: config_path.clone(),
            source,
        })?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| ComputeError::Model {
            path: config_path.clone(),
            why: e.to_string(),
        })?;
        if config.heads == 0 || !config.hidden.is_multiple_of(config.heads) {
            return Err(ComputeError::Model {
                path: config_path,
                why: format!("{} heads do not divide {}", config.heads, config.hidden),
            });
        }
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| ComputeError::Read {
            path: path.clone(),
            source,
        })?;
        let model_err = |why: String| ComputeError::Model {
            path: path.clone(),
            why,
        };
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| model_err(e.to_string()))?;
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ComputeError> {
            let t = st
                .tensor(name)
                .map_err(|e| model_err(format!("{name}: {e}")))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(model_err(format!("{name}: {:?}, not F32", t.dtype())));
            }
            if t.shape() != shape {
                return Err(model_err(format!(
                    "{name}: shape {:?}, expected {shape:?}",
                    t.shape()
                )));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let h = config.hidden;
        let linear = |name: &str, input: usize, output: usize| -> Result<Linear, ComputeError> {
            Ok(Linear {
                weight: tensor(&format!("{name}.weight"), &[output, input])?,
                bias: tensor(&format!("{name}.bias"), &[output])?,
                input,
                output,
            })
        };
        let norm = |name: &str| -> Result<LayerNorm, ComputeError> {
            Ok(LayerNorm {
                weight: tensor(&format!("{name}.weight"), &[h])?,
                bias: tensor(&format!("{name}.bias"), &[h])?,
            })
        };
        let layers = (0..config.layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: linear(&format!("{p}.attention.self.query"), h, h)?,
                    key: linear(&format!("{p}.attention.self.key"), h, h)?,
                    value: linear(&format!("{p}.attention.self.value"), h, h)?,
                    attention_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: linear(
                        &format!("{p}.intermediate.dense"),
                        h,
                        config.intermediate,
                    )?,
                    output: linear(&format!("{p}.output.dense"), config.intermediate, h)?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, ComputeError>>()?;
        Ok(Self {
            word_embeddings: tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position_embeddings: tensor(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type_embeddings: tensor(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            embeddings_norm: norm("embeddings.LayerNorm")?,
            layers,
            config,
        })
    }
}
