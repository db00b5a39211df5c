/**
 * QEMU 7.2 memory snapshots (migration streams, libvirt save images): parse and index without
 * loading them, read RAM blocks as ChunkSources, write full and sparse streams back.
 *
 * Glossary: *block* = a RAM block of the stream's MEM_SIZE list (pc.ram, pc.bios, …);
 * *page* = 4 KiB of a block; *prefix* = header + configuration; *START section* = ram START
 * with the block list; *tail* = the opaque device state after the last ram section.
 */
export { openMemorySnapshot, memorySnapshotFromBuffer } from './snapshot.js';
export type { BlockInfo, MemorySnapshot } from './snapshot.js';
export type { PageCounts, PageStates } from './page-table.js';
export type { Range, RecordCounts } from './parse.js';
export type { LibvirtSaveHeader } from './libvirt.js';
export { buildLibvirtHeader } from './libvirt.js';
export { MigrationStreamWriter } from './writer.js';
export type { WriterStats } from './writer.js';
export { copyBlock, writeFullStream } from './full-stream.js';
export { sparseStreamPagesVsBase, writeSparseStream } from './sparse.js';
export type { SparsePage, SparseStreamStats } from './sparse.js';
export { openRamFile, writeRamFile } from './ram-file.js';
export type { RamFile, RamFileStats } from './ram-file.js';
export { PAGE_SIZE } from '../../util/page.js';
