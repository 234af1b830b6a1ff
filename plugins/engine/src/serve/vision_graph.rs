//! A vision tower's encoding of small images recorded once per patch grid as a CUDA graph and
//! replayed (as the decode steps are, [`super::graph`]; burn's `burn::tensor::capture`).
//!
//! A 448x448 image (784 patches) is encoded by about 450 kernel launches and 150 cuBLAS
//! products on a Qwen3-VL-2B tower, each a few microseconds of GPU work: queuing them costs
//! the host more than the GPU needs to run them, so the image prompt's time to first token
//! waited on the host (`benches/results/gpu-h100-2026-12-07c-vl-launches.md`). Everything
//! such an encoding reads is fixed by the image's patch grid except the patches themselves:
//! the grid's resampled position embeddings and rotary angles are computed once and held by
//! the recording, and each image's patches are written in place into the buffer the graph
//! was recorded against. The recording runs the encoding four times (burn's three warm-up
//! runs and the capture), so a grid is recorded at its second image, not its first: an image
//! size seen once (common where sizes vary) costs one encoding, not four, and a size seen
//! again costs its recording once. The last [`KEPT_GRIDS`] grids' recordings are kept. Grids of more than [`MAX_PATCHES`] patches are
//! encoded directly: their kernels are long enough that the host keeps ahead, and a
//! recording would hold their large attention scores.

use crate::error::EngineError;
use crate::generate::Model;
use crate::vision::{ImageFeatures, PatchGrid, VisionTower};
use burn::tensor::{Graph, Tensor, capture, s};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// Patches up to which an image's encoding is recorded (a 512x512 image at 16-pixel patches).
pub const MAX_PATCHES: usize = 1024;
/// Recorded grids kept, the least recently used dropped first.
pub const KEPT_GRIDS: usize = 4;
/// Grids remembered as seen once (not recorded yet), the oldest forgotten first.
pub const SEEN_GRIDS: usize = 32;

/// The grids seen once: a grid is recorded when it comes again ([`Sightings::again`]).
#[derive(Debug, Default)]
pub struct Sightings {
    seen: Vec<PatchGrid>,
}

impl Sightings {
    /// Whether `grid` was seen before (and is forgotten now, as it is about to be recorded);
    /// else it is remembered and `false`.
    pub fn again(&mut self, grid: PatchGrid) -> bool {
        if let Some(i) = self.seen.iter().position(|g| *g == grid) {
            self.seen.remove(i);
            return true;
        }
        if self.seen.len() == SEEN_GRIDS {
            self.seen.remove(0);
        }
        self.seen.push(grid);
        false
    }
}

type EncodeFn = Box<dyn FnMut() -> Tensor<2>>;

/// One grid's recording: declared before `patches`, so the graph goes before the buffer it
/// reads.
struct Recorded {
    grid: PatchGrid,
    graph: Graph<Tensor<2>, EncodeFn>,
    /// The patches buffer the graph reads, refreshed in place for each image.
    patches: Rc<RefCell<Tensor<2>>>,
}

/// Counts for the log and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VisionCounts {
    pub recorded: usize,
    pub replayed: usize,
    pub direct: usize,
}

/// The recorded encodings of a model's vision tower (not `Send`: made and used on the
/// serving loop's thread, the stream it records on).
pub struct VisionGraphs {
    model: Arc<Model>,
    /// Whether encodings are recorded (CUDA devices with `cuda_graphs`); false after a
    /// capture failed.
    records: bool,
    /// A capture failed: nothing is recorded again.
    failed: bool,
    kept: Vec<Recorded>,
    sightings: Sightings,
    pub counts: VisionCounts,
}

impl VisionGraphs {
    /// Records where `cuda_graphs` is on and the model is on a device that can (not the CPU).
    pub fn new(model: Arc<Model>, cuda_graphs: bool) -> Self {
        let records = cuda_graphs && model.decoder.device != burn::tensor::Device::flex();
        Self { model, records, failed: false, kept: Vec::new(), sightings: Sightings::default(), counts: VisionCounts::default() }
    }

    /// Follows the `cuda_graphs` setting (changed at run time); off drops the recordings. A
    /// failed capture's stop stays until the loop restarts.
    pub fn set_cuda_graphs(&mut self, cuda_graphs: bool) {
        if !cuda_graphs {
            self.kept.clear();
        }
        self.records = cuda_graphs && !self.failed && self.model.decoder.device != burn::tensor::Device::flex();
    }

    /// Drops every recording (and the device memory it holds); returns how many there were.
    pub fn drop_recordings(&mut self) -> usize {
        let n = self.kept.len();
        self.kept.clear();
        n
    }

    /// One image's features ([`crate::vision::VisionTower::encode`]): replayed from its grid's
    /// recording where there is one, recorded first where its grid was seen before, directly
    /// otherwise.
    pub fn encode(&mut self, pixels: &[f32], grid: PatchGrid) -> Result<ImageFeatures, EngineError> {
        let model = Arc::clone(&self.model);
        let Some(tower) = model.decoder.vision.as_ref() else {
            return Err(EngineError::InvalidRequest("this model has no vision tower".into()));
        };
        let x = tower.patches(pixels, grid)?;
        let sets = tower.deepstack_layers();
        let index = if !self.records || grid.patches() > MAX_PATCHES {
            None
        } else {
            match self.kept.iter().position(|r| r.grid == grid) {
                Some(i) => {
                    let recorded = self.kept.remove(i);
                    if recorded.patches.borrow().can_mut() {
                        recorded.patches.borrow_mut().inplace(|t| t.slice_assign(s![0..grid.patches()], x.clone()));
                        self.kept.push(recorded);
                        Some(self.kept.len() - 1)
                    } else {
                        // A refresh would land in a copy the graph never reads: record anew.
                        drop(recorded);
                        self.record(tower, x.clone(), grid)
                    }
                }
                None if self.sightings.again(grid) => self.record(tower, x.clone(), grid),
                None => None,
            }
        };
        // Not recorded (no recording here, a grid past the size or seen once, a failed
        // capture): encoded directly.
        let Some(recorded) = index.and_then(|i| self.kept.get_mut(i)) else {
            self.counts.direct += 1;
            return Ok(tower.encode_patches(x, &tower.grid_inputs(grid)));
        };
        // SAFETY: `Graph::replay` requires every buffer the recorded encoding touched to be
        // alive, unused by anything else during the replay, and refreshed on the recording
        // stream. It reads the tower's weights (held by the closure's `Arc` of the model), the
        // grid's inputs (owned by the closure) and the patches buffer (held by the closure's
        // `Rc`, refreshed in place above on this thread); intermediates are retained by the
        // graph, which is dropped before the buffer (`Recorded`'s field order). This type is
        // not `Send`: refreshes, replays and the copy of the output below all happen on the
        // serving loop's thread, on the stream it recorded on.
        let out = unsafe { recorded.graph.replay() }.clone();
        self.counts.replayed += 1;
        // The graph overwrites its output buffer at every replay, and a request keeps its
        // image's features over several steps: they are copied out.
        Ok(ImageFeatures::from_stacked(out.add_scalar(0.0), sets))
    }

    /// Records `tower`'s encoding of `grid` with `x` as its patches buffer, keeps it and
    /// returns its index; `None` after a failed capture (recording stops).
    fn record(&mut self, tower: &VisionTower, x: Tensor<2>, grid: PatchGrid) -> Option<usize> {
        let inputs = tower.grid_inputs(grid);
        // The closure cannot return an error: it finds the tower its caller found.
        let patches = Rc::new(RefCell::new(x));
        let (model, buffer) = (Arc::clone(&self.model), Rc::clone(&patches));
        let encode: EncodeFn = Box::new(move || match model.decoder.vision.as_ref() {
            Some(tower) => tower.encode_patches(buffer.borrow().clone(), &inputs).stacked(),
            None => unreachable!("the model's tower was checked before recording"),
        });
        crate::progress::log(|| format!("recording the vision tower for {}x{}x{} patches", grid.t, grid.h, grid.w));
        let graph = capture(&self.model.decoder.device, encode);
        self.counts.recorded += 1;
        if !graph.is_hardware() {
            self.records = false;
            self.failed = true;
            self.kept.clear();
            eprintln!("inference-pio: recording the vision tower as a CUDA graph failed; images are encoded uncaptured");
            return None;
        }
        self.kept.push(Recorded { grid, graph, patches });
        if self.kept.len() > KEPT_GRIDS {
            self.kept.remove(0);
        }
        Some(self.kept.len() - 1)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_is_recorded_when_it_comes_again() {
        let grid = |h: usize| PatchGrid { t: 1, h, w: 4 };
        let mut s = Sightings::default();
        assert!(!s.again(grid(2)));
        assert!(!s.again(grid(4)));
        assert!(s.again(grid(2)));
        // Recorded (and forgotten): a third image of it is the recording's business.
        assert!(!s.again(grid(2)));
        // The oldest of more than SEEN_GRIDS sizes seen once is forgotten.
        let mut s = Sightings::default();
        for h in 0..=SEEN_GRIDS {
            assert!(!s.again(grid(h)));
        }
        assert!(!s.again(grid(0)));
        assert!(s.again(grid(SEEN_GRIDS)));
    }
}
