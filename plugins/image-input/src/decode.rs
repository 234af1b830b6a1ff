//! Image files into RGB8 pixels, as transformers' processors receive them from Pillow
//! (`PIL.Image.open` + `transformers.image_transforms.convert_to_rgb`): PNG, JPEG and WebP
//! decoded by the `image` crate; an image with alpha composited over white, as
//! `convert_to_rgb` does; grey expanded to RGB. Files over the byte limit, images over the
//! pixel limit, corrupt data and other formats are refused with an error naming the problem.

use crate::ImageError;
use image::{DynamicImage, ImageFormat, ImageReader};
use std::io::Cursor;

/// The largest file and image accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// 20 MB files (OpenAI's per-image limit) and 64 megapixels.
    fn default() -> Self {
        Self { max_bytes: 20_000_000, max_pixels: 64_000_000 }
    }
}

/// Decoded pixels: `height` rows of `width` RGB8 pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decodes a PNG, JPEG or WebP file's bytes.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<Rgb8, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge(format!("the file is {} bytes, over the limit of {}", bytes.len(), limits.max_bytes)));
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::Format("the data is not a PNG, JPEG or WebP image".into()))?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) {
        return Err(ImageError::Format(format!("{format:?} images are not supported (PNG, JPEG, WebP)")));
    }
    let reader = || ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader().into_dimensions().map_err(|e| ImageError::Corrupt(format!("{format:?}: {e}")))?;
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(ImageError::TooLarge(format!("the image is {w}x{h} pixels, over the limit of {} pixels", limits.max_pixels)));
    }
    let mut reader = reader();
    let mut decode_limits = image::Limits::default();
    // Room for the decoded image at 16 bits per channel with alpha, and no more.
    decode_limits.max_alloc = Some(u64::from(w) * u64::from(h) * 8 + (1 << 20));
    reader.limits(decode_limits);
    let image = reader.decode().map_err(|e| ImageError::Corrupt(format!("{format:?}: {e}")))?;
    Ok(to_rgb(image))
}

/// RGB8, alpha composited over white (`convert_to_rgb`).
fn to_rgb(image: DynamicImage) -> Rgb8 {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let pixels = if image.color().has_alpha() {
        let rgba = image.to_rgba8();
        rgba.pixels()
            .flat_map(|p| {
                let a = u32::from(p[3]);
                let over = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
                [over(p[0]), over(p[1]), over(p[2])]
            })
            .collect()
    } else {
        image.to_rgb8().into_raw()
    };
    Rgb8 { width, height, pixels }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Rgba};

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn png_round_trips_and_alpha_goes_over_white() {
        let rgba = ImageBuffer::from_fn(3, 2, |x, y| Rgba([x as u8 * 50, y as u8 * 100, 7, if x == 0 { 255 } else { 0 }]));
        let got = decode_image(&png(DynamicImage::ImageRgba8(rgba)), &DecodeLimits::default()).expect("decode");
        assert_eq!((got.width, got.height), (3, 2));
        assert_eq!(&got.pixels[..3], &[0, 0, 7]);
        assert_eq!(&got.pixels[3..6], &[255, 255, 255]);
    }

    #[test]
    fn bad_files_are_named() {
        let limits = DecodeLimits { max_bytes: 1_000, max_pixels: 100 };
        let err = |bytes: &[u8]| decode_image(bytes, &limits).expect_err("refused").to_string();
        assert!(err(b"hello there").contains("not a PNG, JPEG or WebP"), "{}", err(b"hello there"));
        assert!(err(&[0u8; 2_000]).contains("over the limit of 1000"));
        let big = png(DynamicImage::new_rgb8(20, 20));
        assert!(err(&big).contains("20x20 pixels, over the limit of 100"), "{}", err(&big));
        let mut cut = png(DynamicImage::new_rgb8(5, 5));
        cut.truncate(cut.len() - 20);
        assert!(err(&cut).contains("Png"), "{}", err(&cut));
        // GIF is recognised and refused by name.
        assert!(err(b"GIF89a\x01\x00\x01\x00").contains("Gif images are not supported"));
    }
}
