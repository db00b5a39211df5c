/**
 * The one 4 KiB of the code base: the x86 guest page (QEMU's TARGET_PAGE_BITS = 12, so every
 * RAM offset and block length of a migration stream is a multiple of it), and by design also
 * the chunk every target is cut into (delta/chunk.ts) and the unit the disk writers are fed in:
 * a page of RAM and a filesystem block of the disk line up, so one chunk can refer to the other.
 */
export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12;
