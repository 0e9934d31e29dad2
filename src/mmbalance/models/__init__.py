from .encoders import build_encoder
from .fusion import FUSIONS, Fusion, build_fusion, zero_out
from .multimodal import ModelOutput, MultimodalModel
from .resnet import ResNet18Encoder, ogm_init

__all__ = ["build_encoder", "FUSIONS", "Fusion", "build_fusion", "zero_out", "ModelOutput",
           "MultimodalModel", "ResNet18Encoder", "ogm_init", "build_model"]


def build_model(modalities, input_shapes, num_classes, model_cfg, encoder_hints=None, heads=None) -> MultimodalModel:
    """Build the model from a dataset's shapes and the ``model`` config section."""
    encoder_hints = encoder_hints or {}
    encoders = {}
    for m in modalities:
        kind = model_cfg.encoders.get(m) or (encoder_hints.get(m, "auto") if model_cfg.encoder == "auto" else model_cfg.encoder)
        encoders[m] = build_encoder(input_shapes[m], kind, feature_dim=model_cfg.feature_dim,
                                    hidden_dim=model_cfg.hidden_dim, dropout=model_cfg.dropout,
                                    small_input=model_cfg.small_input, modality=m)
    dims = {m: e.out_dim for m, e in encoders.items()}
    fusion = build_fusion(model_cfg.fusion, dims, num_classes, model_cfg.fusion_hidden)
    ogm_init(fusion)
    # heads (if any) are built and OGM-initialised by MultimodalModel.add_heads
    return MultimodalModel(encoders, fusion, num_classes, heads=model_cfg.unimodal_heads if heads is None else heads)
