//! Walking every [`Linear`] of the model (LoRA injection, parameter tables). Each module
//! lists its linear layers in checkpoint order; a `Linear` knows its own path (= the
//! transformers key prefix), so visitors need no path bookkeeping.

use super::decoder::{DetrDecoder, DetrDecoderLayer};
use super::encoder::{DetrEncoder, DetrEncoderLayer};
use super::geometry::{GeometryEncoder, GeometryEncoderLayer};
use super::mask_head::MaskDecoder;
use super::model::Sam3Model;
use super::nn::{DecoderMlp, Linear, Mlp, MultiHeadAttention};
use super::scoring::DotProductScoring;
use super::text::{ClipEncoderLayer, TextEncoder};
use super::vision::{ViTAttention, ViTLayer, ViTModel, VisionModel};

/// Something that contains linear layers.
pub trait VisitLinears {
    /// Call `f` on every linear layer, in checkpoint order.
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear));
}

impl VisitLinears for Linear {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(self)
    }
}

impl<T: VisitLinears> VisitLinears for Vec<T> {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        for x in self {
            x.visit_linears(f);
        }
    }
}

/// Implement [`VisitLinears`] by visiting the listed fields in order.
macro_rules! visit_fields {
    ($ty:ty => $($field:ident).+ $(, $($rest:ident).+)* $(,)?) => {
        impl VisitLinears for $ty {
            fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
                self.$($field).+.visit_linears(f);
                $(self.$($rest).+.visit_linears(f);)*
            }
        }
    };
}

visit_fields!(MultiHeadAttention => q_proj, k_proj, v_proj, o_proj);
visit_fields!(Mlp => fc1, fc2);
visit_fields!(DecoderMlp => layers);
visit_fields!(ViTAttention => q_proj, k_proj, v_proj, o_proj);
visit_fields!(ViTLayer => attention, mlp);
visit_fields!(ViTModel => layers);
visit_fields!(VisionModel => backbone);
visit_fields!(ClipEncoderLayer => self_attn, mlp);
visit_fields!(TextEncoder => layers, resizer);
visit_fields!(GeometryEncoderLayer => self_attn, cross_attn, mlp);
visit_fields!(GeometryEncoder => boxes_direct_project, boxes_pool_project, boxes_pos_enc_project, final_proj, layers);
visit_fields!(DetrEncoderLayer => self_attn, cross_attn, mlp);
visit_fields!(DetrEncoder => layers);
visit_fields!(DetrDecoderLayer => self_attn, text_cross_attn, vision_cross_attn, mlp);
visit_fields!(DetrDecoder => layers, box_head, presence_head, ref_point_head, box_rpb_embed_x, box_rpb_embed_y);
visit_fields!(DotProductScoring => text_mlp, text_proj, query_proj);
visit_fields!(MaskDecoder => prompt_cross_attn, mask_embedder, instance_projection, semantic_projection);
visit_fields!(Sam3Model => vision, text, geometry, encoder, decoder, scoring, mask);
