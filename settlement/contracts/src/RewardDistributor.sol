// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";

/// @title RewardDistributor: a cumulative Merkle distribution that never pays twice.
/// @notice Each epoch the settler publishes (epoch, root, cumulativeTotal). A leaf is
/// keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount)))) (OpenZeppelin
/// StandardMerkleTree convention); anyone may claim for an account, which receives
/// cumulativeAmount - claimed[account]. Replaying a claim pays zero by construction.
/// @dev Gas: the publication state lives in one slot shared with Pausable's flag
/// (paused | epoch | cumulativeTotal | funded) plus the root, so a steady-state
/// publication touches two slots. Funding: `publish` pulls cumulativeTotal - funded
/// from the caller with transferFrom in the same transaction; a treasury may
/// prefund with `fund`, and then a publication moves no tokens at all.
contract RewardDistributor is AccessControl, Pausable {
    using SafeERC20 for IERC20;

    bytes32 public constant SETTLER_ROLE = keccak256("SETTLER_ROLE");
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");

    IERC20 public immutable token;

    // Packed after Pausable's bool in one slot: 1 + 5 + 13 + 13 = 32 bytes.
    uint40 private _epoch;
    uint104 private _cumulativeTotal;
    uint104 private _funded;
    bytes32 private _root;

    mapping(address account => uint256) public claimed;

    event RootPublished(uint256 indexed epoch, bytes32 root, uint256 cumulativeTotal);
    event Funded(address indexed from, uint256 amount, uint256 funded);
    event Claimed(address indexed account, uint256 amount, uint256 cumulativeAmount);

    error EpochNotIncreasing(uint256 epoch, uint256 lastEpoch);
    error TotalDecreased(uint256 cumulativeTotal, uint256 lastCumulativeTotal);
    error InvalidProof();
    error NothingToClaim();
    error ZeroAddress();

    constructor(IERC20 token_, address admin, address settler) {
        if (address(token_) == address(0) || admin == address(0) || settler == address(0)) revert ZeroAddress();
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(PAUSER_ROLE, admin);
        _grantRole(SETTLER_ROLE, settler);
    }

    /// @notice Publish an epoch's root; pulls the unfunded part of cumulativeTotal from the caller.
    function publish(uint256 epoch, bytes32 root, uint256 cumulativeTotal)
        external
        onlyRole(SETTLER_ROLE)
        whenNotPaused
    {
        uint256 lastEpoch = _epoch;
        if (epoch <= lastEpoch) revert EpochNotIncreasing(epoch, lastEpoch);
        uint256 lastTotal = _cumulativeTotal;
        if (cumulativeTotal < lastTotal) revert TotalDecreased(cumulativeTotal, lastTotal);
        uint256 funded = _funded;
        _epoch = SafeCast.toUint40(epoch);
        _cumulativeTotal = SafeCast.toUint104(cumulativeTotal);
        _root = root;
        if (cumulativeTotal > funded) {
            _funded = uint104(cumulativeTotal);
            token.safeTransferFrom(msg.sender, address(this), cumulativeTotal - funded);
            emit Funded(msg.sender, cumulativeTotal - funded, cumulativeTotal);
        }
        emit RootPublished(epoch, root, cumulativeTotal);
    }

    /// @notice Add funds ahead of publications (a treasury top-up).
    function fund(uint256 amount) external {
        uint256 funded = uint256(_funded) + amount;
        _funded = SafeCast.toUint104(funded);
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Funded(msg.sender, amount, funded);
    }

    /// @notice Pay `account` what the current root owes it beyond what it already claimed.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof) external whenNotPaused {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, _root, leaf)) revert InvalidProof();
        uint256 already = claimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim();
        claimed[account] = cumulativeAmount;
        uint256 amount = cumulativeAmount - already;
        token.safeTransfer(account, amount);
        emit Claimed(account, amount, cumulativeAmount);
    }

    /// @notice The published state: last epoch, its root and cumulative total, and funds received.
    function state() external view returns (uint256 epoch, bytes32 root, uint256 cumulativeTotal, uint256 funded) {
        return (_epoch, _root, _cumulativeTotal, _funded);
    }

    function pause() external onlyRole(PAUSER_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(PAUSER_ROLE) {
        _unpause();
    }
}
