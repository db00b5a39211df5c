/**
 * Glance as a store of cloudlet images (docs/openstack.md has the layout and why):
 *
 *   base package   one image per base VM: the `base export` package (a sparse tar of the
 *                  library's base directory), cloudlet_type=base_package,
 *                  cloudlet_base_id=<sha256>, and a summary of the VM spec as properties
 *   overlay        one image per overlay file, cloudlet_type=overlay, cloudlet_base_id=<sha256>
 *
 * Every upload is streamed and checked afterwards against what Glance says it stored (size and
 * hash); a failed or interrupted upload deletes its image, so only complete images stay
 * (status active). A pulled base is verified byte for byte like `base import` of a package;
 * an overlay is resolved to its /v2/images/ID/file URL with the auth headers, after checking
 * its type and base, for the synthesis pipeline to fetch (ranged GETs work: Glance answers 206).
 */
export { CloudletType, GLANCE_SCHEME, glanceImageId, glanceRef, isGlanceRef, openGlance } from './image.js';
export { listOverlays, pushOverlay, removeOverlay, resolveOverlaySource } from './overlays.js';
export type { GlanceOverlay, OverlayPushResult, OverlaySource, ResolveOptions } from './overlays.js';
export { listGlanceBases, pullBase, pushBase } from './bases.js';
export type { BasePullResult, BasePushResult, GlanceBase } from './bases.js';
