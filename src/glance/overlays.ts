/**
 * Overlays in Glance: one image per overlay file (cloudlet_type=overlay, cloudlet_base_id).
 * resolveOverlaySource() turns glance://IMAGE_ID into a URL + headers after checking the
 * image's type and base, for the synthesis pipeline to fetch (Glance honours Range requests).
 * The file's bytes are opaque here: api/glance.ts checks an overlay before it is uploaded.
 */
import { BaseMismatchError } from '../util/errors.js';
import type { Progress } from '../util/progress.js';
import { TOOL } from '../util/version.js';
import type { SessionOptions } from './auth.js';
import { findBaseImage } from './bases.js';
import type { GlanceClient } from './client.js';
import { BASE_ID, CloudletType, expectType, glanceImageId, glanceRef, openGlance, prop, sha256Of } from './image.js';
import { uploadImage, type UploadSpec, type Uploaded } from './upload.js';

export interface OverlaySource {
  /** GET this (with `headers`) for the overlay's bytes; Range requests are honoured. */
  url: string;
  headers: Record<string, string>;
  size?: number;
  /** sha256 of the whole file, when known (os_hash_value with hashing_algorithm = sha256). */
  sha256?: string;
  imageId: string;
  /** The base the overlay was made for (cloudlet_base_id). */
  baseId?: string;
}

export interface ResolveOptions extends SessionOptions {
  /** Refuse (BaseMismatchError) an overlay made for another base, before any download. */
  expectBase?: string;
}

/** glance://IMAGE_ID → where to read the overlay, after checking it is one (and for which base). */
export async function resolveOverlaySource(ref: string, opts: ResolveOptions = {}): Promise<OverlaySource> {
  const id = glanceImageId(ref);
  const client = await openGlance(opts);
  const image = await client.getImage(id);
  expectType(client, image, CloudletType.overlay);
  const baseId = prop(image, 'cloudlet_base_id');
  if (opts.expectBase && baseId !== opts.expectBase) {
    throw new BaseMismatchError(
      `Glance image ${id} is an overlay for base ${(baseId ?? 'unknown').slice(0, 12)}, ` +
        `not for base ${opts.expectBase.slice(0, 12)}`,
      { image: id, expected_base: baseId ?? null, actual_base: opts.expectBase },
    );
  }
  return {
    url: client.fileUrl(id),
    headers: client.authHeaders(),
    size: image.size ?? undefined,
    sha256: sha256Of(image),
    imageId: id,
    baseId,
  };
}

/** What an overlay image records about its overlay (read from the file's checked header). */
export interface OverlayInfo {
  baseId: string;
  /** Format major.minor. */
  version: string;
  /** Carries a memory snapshot (synthesize can resume it). */
  resumable: boolean;
  machine?: string;
}

/** Uploads an overlay file's bytes (`data`, `size` of them) as one checked image. */
export async function uploadOverlay(
  client: GlanceClient,
  info: OverlayInfo,
  opts: { name: string; data: UploadSpec['data']; size: number; visibility?: string; progress: Progress },
): Promise<Uploaded> {
  const properties: Record<string, string> = {
    cloudlet_type: CloudletType.overlay,
    cloudlet_base_id: info.baseId,
    cloudlet_overlay_version: info.version,
    cloudlet_resumable: String(info.resumable),
    cloudlet_creator: TOOL,
  };
  if (info.machine) properties['cloudlet_machine'] = info.machine;
  return uploadImage(client, {
    image: { name: opts.name, disk_format: 'raw', container_format: 'bare', visibility: opts.visibility, properties },
    data: opts.data,
    size: opts.size,
    label: `uploading ${opts.name}`,
    progress: opts.progress,
  });
}

export interface GlanceOverlay {
  image_id: string;
  url: string;
  name: string | null;
  base_id?: string;
  size: number | null;
  status: string;
  created_at: string;
}

/** Overlays in Glance, all or those made for one base (a full id, or a base id prefix or name in Glance). */
export async function listOverlays(client: GlanceClient, base?: string): Promise<GlanceOverlay[]> {
  const filters: Record<string, string> = { cloudlet_type: CloudletType.overlay };
  if (base) {
    // A full id as is; a name or id prefix through the base packages in Glance.
    filters['cloudlet_base_id'] = BASE_ID.test(base)
      ? base
      : (prop(await findBaseImage(client, base), 'cloudlet_base_id') ?? base);
  }
  const images = await client.listImages(filters);
  return images.map((i) => ({
    image_id: i.id,
    url: glanceRef(i.id),
    name: i.name,
    base_id: prop(i, 'cloudlet_base_id'),
    size: i.size,
    status: i.status,
    created_at: i.created_at,
  }));
}

/** Deletes an overlay image (refusing to delete anything that is not one); returns its id. */
export async function removeOverlay(client: GlanceClient, ref: string): Promise<string> {
  const id = glanceImageId(ref);
  const image = await client.getImage(id);
  // Any overlay image, also one whose upload never finished; nothing else.
  if (prop(image, 'cloudlet_type') !== CloudletType.overlay) expectType(client, image, CloudletType.overlay);
  await client.deleteImage(id);
  return id;
}
